// clsuite site: click a column header to sort its table (numbers as numbers, again to reverse); type in the
// filter box to hide the rows of every sortable table that do not contain each word typed.
(function () {
  "use strict";
  function key(cell) {
    if (!cell) return "";
    return (cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent).trim();
  }
  function missing(s) { return s === "" || s === "–" || s === "-"; }
  function number(s) {
    return /^[-+−]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?/i.test(s) ? parseFloat(s.replace("−", "-")) : NaN;
  }
  function compare(a, b) {
    var x = number(a), y = number(b);
    if (!isNaN(x) && !isNaN(y)) return x - y;
    if (!isNaN(x) !== !isNaN(y)) return isNaN(x) ? 1 : -1;
    return a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
  }
  function sortBy(th) {
    var table = th.closest("table"), body = table.tBodies[0];
    if (!body) return;
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(body.rows).map(function (row, i) {
      return {row: row, key: key(row.cells[col]), i: i};
    });
    rows.sort(function (a, b) {
      var ma = missing(a.key), mb = missing(b.key);
      if (ma || mb) return ma === mb ? a.i - b.i : (ma ? 1 : -1);  // no value: last either way
      return (ascending ? compare(a.key, b.key) : compare(b.key, a.key)) || a.i - b.i;
    });
    rows.forEach(function (r) { body.appendChild(r.row); });
  }
  document.addEventListener("click", function (e) {
    var th = e.target.closest("table.sortable thead th");
    if (th) sortBy(th);
  });
  document.addEventListener("keydown", function (e) {
    var th = e.target.closest && e.target.closest("table.sortable thead th");
    if (th && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); sortBy(th); }
  });
  document.addEventListener("input", function (e) {
    if (!e.target.matches("input.filter")) return;
    var words = e.target.value.toLowerCase().split(/\s+/).filter(Boolean);
    document.querySelectorAll("table.sortable tbody tr").forEach(function (row) {
      var text = row.textContent.toLowerCase();
      row.hidden = !words.every(function (w) { return text.indexOf(w) >= 0; });
    });
  });
  document.querySelectorAll("table.sortable thead th").forEach(function (th) {
    th.tabIndex = 0;
    th.title = "sort by this column (again to reverse)";
  });
})();
