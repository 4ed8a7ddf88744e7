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
    if (layer.channels.indexOf(channel) < 0) {
      return { error: "channel " + channel + " has no page in this atlas (visualised: " + layer.channels.length + " per layer)" };
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
      var img = document.createElement("img");
      img.src = link.getAttribute("href");
      img.alt = link.getAttribute("title") || "";
      viewer.innerHTML = "";
      viewer.appendChild(img);
      viewer.hidden = false;
    });
  }

  setupSearch();
  setupKeys();
  setupViewer();
})();
