// Keyboard reviewing. The keys only fill in the form's own fields, so it works the same without this script.
// Ranking: letters from best to worst; "=" ties the next letter with the previous one.
(function () {
  const form = document.getElementById("review-form");
  if (!form || form.dataset.kind !== "rank") return;
  const selects = Array.from(form.querySelectorAll("select[data-label]"));
  const byLabel = Object.fromEntries(selects.map((s) => [s.dataset.label, s]));
  const order = document.getElementById("order");
  let groups = [];  // [["A"], ["C", "B"]]: best group first, ties share a group
  let tieNext = false;

  function apply() {
    selects.forEach((s) => { s.value = ""; });
    let rank = 1;
    for (const group of groups) {
      group.forEach((label) => { byLabel[label].value = String(rank); });
      rank += group.length;  // competition ranking: 1, 2, 2, 4
    }
    show();
  }

  function show() {  // the order as the boxes say it (also after picking ranks by hand)
    const ranked = selects.filter((s) => s.value).sort((a, b) => a.value - b.value);
    document.querySelectorAll(".card").forEach((c) => c.classList.toggle("placed", byLabel[c.dataset.label].value !== ""));
    if (!ranked.length) { order.innerHTML = '<span class="muted">Your order appears here.</span>'; return; }
    const parts = [];
    ranked.forEach((s, i) => {
      const sep = i === 0 ? "" : (s.value === ranked[i - 1].value ? " = " : " > ");
      parts.push(sep + s.dataset.label);
    });
    const left = selects.length - ranked.length;
    order.textContent = "Order: " + parts.join("") + (tieNext ? " = …" : "") + (left ? "  (" + left + " left)" : "  ✓ press Enter to submit");
  }

  function pick(label) {
    if (!byLabel[label] || groups.some((g) => g.includes(label))) return;
    if (tieNext && groups.length) groups[groups.length - 1].push(label); else groups.push([label]);
    tieNext = false;
    apply();
  }

  document.addEventListener("keydown", (e) => {
    if (["TEXTAREA", "INPUT", "SELECT"].includes(e.target.tagName) || e.ctrlKey || e.metaKey || e.altKey) return;
    const key = e.key.length === 1 ? e.key.toUpperCase() : e.key;
    if (key === "=") { tieNext = groups.length > 0; show(); }
    else if (key === "Backspace") { const g = groups[groups.length - 1]; if (g) { g.pop(); if (!g.length) groups.pop(); } tieNext = false; apply(); }
    else if (key === "Escape") { groups = []; tieNext = false; apply(); }
    else if (key === "Enter") form.requestSubmit();  // validates first, like the button
    else if (byLabel[key]) pick(key);
    else return;
    e.preventDefault();
  });
  form.querySelectorAll("[data-pick]").forEach((b) => b.addEventListener("click", () => pick(b.dataset.pick)));
  selects.forEach((s) => s.addEventListener("change", () => { groups = []; show(); }));
  show();
})();

// Rubric and thumbs: a key sets the highlighted row's radio button and moves to the next row;
// arrow keys move, Enter submits. `valueFor(key)` is the radio value a key stands for.
function radioCursor(form, rows, valueFor) {
  let at = 0;

  function move(to) {
    at = Math.max(0, Math.min(rows.length - 1, to));
    rows.forEach((r, i) => r.classList.toggle("current", i === at));
    rows[at].scrollIntoView({ block: "nearest" });
  }

  document.addEventListener("keydown", (e) => {
    if (["TEXTAREA", "INPUT", "SELECT"].includes(e.target.tagName) && e.target.type !== "radio") return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const value = valueFor(e.key);
    const radio = value === undefined ? null : rows[at].querySelector(`input[type=radio][value="${value}"]`);
    if (radio) { radio.checked = true; move(at + 1); }
    else if (e.key === "ArrowDown" || e.key === "ArrowRight") move(at + 1);
    else if (e.key === "ArrowUp" || e.key === "ArrowLeft" || e.key === "Backspace") move(at - 1);
    else if (e.key === "Enter") form.requestSubmit();
    else return;
    e.preventDefault();
  });
  rows.forEach((r, i) => r.addEventListener("click", () => move(i)));
  move(0);
}

// Rubric: a digit scores the highlighted row (output x criterion).
(function () {
  const form = document.getElementById("review-form");
  if (form && form.dataset.kind === "rubric") radioCursor(form, Array.from(form.querySelectorAll(".score-row")), (key) => key);
})();

// Thumbs: Y or + marks the highlighted answer good, N or - not good.
(function () {
  const form = document.getElementById("review-form");
  const keys = { y: "up", "+": "up", n: "down", "-": "down" };
  if (form && form.dataset.kind === "rate") radioCursor(form, Array.from(form.querySelectorAll(".rate-card")), (key) => keys[key.toLowerCase()]);
})();
