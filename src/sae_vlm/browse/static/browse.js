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

// Heatmaps over a latent's top images: each figure's data-map (patch rows x columns of the latent's code, null:
// not sampled) is drawn on a canvas over its image, on the one scale 0..data-max the latent's images share, so they
// compare; silent patches stay clear. The checkbox shows and hides them all.
var INFERNO = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
  [250, 193, 39], [252, 255, 164]];

function inferno(t) {
  var x = Math.min(Math.max(t, 0), 1) * (INFERNO.length - 1);
  var i = Math.min(Math.floor(x), INFERNO.length - 2), f = x - i;
  return INFERNO[i].map(function (a, k) { return Math.round(a + f * (INFERNO[i + 1][k] - a)); });
}

function drawMap(canvas, map, max) {
  var rows = map.length, cols = map[0].length;
  canvas.width = cols;
  canvas.height = rows;
  var ctx = canvas.getContext("2d"), img = ctx.createImageData(cols, rows);
  for (var r = 0; r < rows; r++) {
    for (var c = 0; c < cols; c++) {
      var v = map[r][c], p = 4 * (r * cols + c), t = max > 0 && v !== null ? v / max : 0, rgb = inferno(t);
      img.data[p] = rgb[0]; img.data[p + 1] = rgb[1]; img.data[p + 2] = rgb[2];
      img.data[p + 3] = v !== null && v > 0 ? Math.round(255 * (0.25 + 0.6 * t)) : 0;
    }
  }
  ctx.putImageData(img, 0, 0);
}

var topImages = document.getElementById("top-images");
if (topImages && topImages.dataset.max !== undefined) {
  var mapMax = parseFloat(topImages.dataset.max);
  topImages.querySelectorAll("figure[data-map]").forEach(function (fig) {
    drawMap(fig.querySelector("canvas.map"), JSON.parse(fig.dataset.map), mapMax);
  });
  var scale = document.getElementById("map-scale"), sctx = scale.getContext("2d");
  for (var x = 0; x < scale.width; x++) {
    var rgb = inferno(x / (scale.width - 1));
    sctx.fillStyle = "rgb(" + rgb.join(",") + ")";
    sctx.fillRect(x, 0, 1, scale.height);
  }
  var showMaps = document.getElementById("show-maps");
  var follow = function () { topImages.classList.toggle("hide-maps", !showMaps.checked); };
  showMaps.addEventListener("change", follow);
  follow();  // a page restored from history keeps the box as it was left
}
