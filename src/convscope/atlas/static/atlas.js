// convscope atlas: search box, arrow-key paging and a full-resolution viewer. No network, no libraries.
(function () {
  "use strict";
  var root = document.body.getAttribute("data-root") || "";
  var index = window.ATLAS_INDEX || { layers: [] };

  function findLayer(text) {
    var wanted = text.trim().toLowerCase();
    if (!wanted) return null;
    var layers = index.layers, i;
    for (i = 0; i < layers.length; i++) {
      if ((layers[i].alias || "").toLowerCase() === wanted || layers[i].name.toLowerCase() === wanted) return layers[i];
    }
    for (i = 0; i < layers.length; i++) {  // then a unique prefix or substring
      var names = [(layers[i].alias || "").toLowerCase(), layers[i].name.toLowerCase()];
      if (names[0].indexOf(wanted) === 0 || names[1].indexOf(wanted) === 0) return layers[i];
    }
    return null;
  }

  // The channels with pages, as sorted [first, last] runs.
  function hasChannel(layer, channel) {
    var runs = layer.channels, lo = 0, hi = runs.length - 1;
    while (lo <= hi) {
      var mid = (lo + hi) >> 1;
      if (channel < runs[mid][0]) hi = mid - 1; else if (channel > runs[mid][1]) lo = mid + 1; else return true;
    }
    return false;
  }

  // "layer" or "layer:channel"; the layer name itself may contain ':' so split at the last one.
  function resolve(query) {
    var text = query.trim(), channel = null, cut = text.lastIndexOf(":");
    if (cut > 0 && /^\s*\d+\s*$/.test(text.slice(cut + 1))) {
      channel = parseInt(text.slice(cut + 1), 10);
      text = text.slice(0, cut);
    }
    var layer = findLayer(text) || findLayer(query);
    if (!layer) return { error: "no layer named " + text };
    var base = root + "L/" + layer.slug + "/";
    if (channel === null || layer === findLayer(query)) return { url: base + "index.html" };
    if (channel >= layer.count) return { error: (layer.alias || layer.name) + " has channels 0.." + (layer.count - 1) };
    if (!hasChannel(layer, channel)) {
      return { error: "channel " + channel + " has no page in this atlas (" + layer.visualised + " of " + layer.count +
               " channels of this layer have pages)" };
    }
    return { url: base + channel + ".html" };
  }

  function setupSearch() {
    var form = document.getElementById("search"), input = document.getElementById("search-input");
    var message = document.getElementById("search-message"), list = document.getElementById("search-names");
    if (!form || !input) return;
    index.layers.forEach(function (layer) {
      var option = document.createElement("option");
      option.value = layer.alias || layer.name;
      if (layer.alias) option.label = layer.name;
      list.appendChild(option);
    });
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var target = resolve(input.value);
      if (target.url) { window.location.href = target.url; } else { message.textContent = target.error; }
    });
    input.addEventListener("input", function () { message.textContent = ""; });
  }

  function setupKeys() {
    document.addEventListener("keydown", function (event) {
      if (event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
      var tag = (event.target && event.target.tagName) || "";
      if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
      if (event.key === "Escape") { closeViewer(); return; }
      var rel = event.key === "ArrowLeft" ? "prev" : event.key === "ArrowRight" ? "next" : null;
      if (!rel) return;
      var link = document.querySelector('link[rel="' + rel + '"]');
      if (link) { event.preventDefault(); window.location.href = link.href; }
    });
  }

  var viewer = null;
  function closeViewer() { if (viewer) { viewer.hidden = true; viewer.innerHTML = ""; } }
  function setupViewer() {
    viewer = document.createElement("div");
    viewer.id = "lightbox";
    viewer.hidden = true;
    viewer.addEventListener("click", closeViewer);
    document.body.appendChild(viewer);
    document.addEventListener("click", function (event) {
      var link = event.target.closest ? event.target.closest("a.zoom") : null;
      if (!link || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
      event.preventDefault();
      viewer.innerHTML = "";
      if (link.classList.contains("stack")) {  // a heat map over its photo: show the pair, larger
        var stack = document.createElement("div");
        stack.className = "stack";
        Array.prototype.forEach.call(link.children, function (part) {
          var copy = part.cloneNode(false);
          if (copy.tagName === "IMG") copy.loading = "eager";
          stack.appendChild(copy);
        });
        viewer.appendChild(stack);
      } else {
        var img = document.createElement("img");
        img.src = link.getAttribute("href");
        img.alt = link.getAttribute("title") || "";
        viewer.appendChild(img);
      }
      viewer.hidden = false;
    });
  }

  // Tables with class "sortable": a click on a heading with data-sort sorts the rows by that column's
  // data-value (numbers; empty cells last), again to reverse.
  function setupSorting() {
    document.querySelectorAll("table.sortable").forEach(function (table) {
      var heads = table.querySelectorAll("th[data-sort]");
      heads.forEach(function (th, column) {
        th.tabIndex = 0;
        function sort() {
          var descending = th.getAttribute("aria-sort") === "ascending";
          heads.forEach(function (other) { other.removeAttribute("aria-sort"); });
          th.setAttribute("aria-sort", descending ? "descending" : "ascending");
          var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
          var keyed = rows.map(function (row, i) {
            var text = row.cells[column].getAttribute("data-value");
            return { row: row, i: i, value: text === null || text === "" ? null : parseFloat(text) };
          });
          keyed.sort(function (a, b) {
            if (a.value === null || b.value === null) return (a.value === null) - (b.value === null) || a.i - b.i;
            return (descending ? b.value - a.value : a.value - b.value) || a.i - b.i;
          });
          var fragment = document.createDocumentFragment();
          keyed.forEach(function (k) { fragment.appendChild(k.row); });
          body.appendChild(fragment);
        }
        th.addEventListener("click", sort);
        th.addEventListener("keydown", function (event) { if (event.key === "Enter") sort(); });
      });
    });
  }

  setupSearch();
  setupKeys();
  setupViewer();
  setupSorting();
})();
