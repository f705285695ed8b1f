// Click a header of a static latent table to sort it (the server sorts its own tables).
document.querySelectorAll("table[data-sortable] th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var desc = th.dataset.dir !== "desc";
    th.dataset.dir = desc ? "desc" : "asc";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = parseFloat(a.cells[col].dataset.v), y = parseFloat(b.cells[col].dataset.v);
      if (isNaN(x)) return isNaN(y) ? 0 : 1;
      if (isNaN(y)) return -1;
      return desc ? y - x : x - y;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});

// The static latent table hides rare latents (positive on fewer than 16 images, the paper's rule) until asked.
var showRare = document.getElementById("show-rare");
if (showRare) {
  showRare.addEventListener("change", function () {
    document.getElementById("latents").classList.toggle("hide-rare", !showRare.checked);
  });
}
