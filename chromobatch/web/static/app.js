// chromobatch review: drag and drop and keyboard relabelling on the cell view. Plain JS, no library.
// Every change is a POST with the session's CSRF token; the page then reloads to show the server's truth.
(function () {
  "use strict";
  var CLASSES = ["1","2","3","4","5","6","7","8","9","10","11","12","13","14","15","16","17","18","19","20",
                 "21","22","X","Y"];
  var csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  var app = document.getElementById("karyogram-app");
  if (!app) { return; }
  var editable = app.dataset.editable === "true";
  var casePk = app.dataset.case;
  var box = document.getElementById("message");

  function show(text) {
    if (!box) { return; }
    box.textContent = text;
    box.classList.remove("hidden");
  }

  function post(url, fields) {
    var body = new URLSearchParams();
    fields.forEach(function (kv) { body.append(kv[0], kv[1]); });
    return fetch(url, {
      method: "POST", body: body, credentials: "same-origin",
      headers: {"X-CSRF-Token": csrf, "Accept": "application/json"}
    }).then(function (r) {
      return r.json().catch(function () { return {ok: false, error: "HTTP " + r.status}; });
    });
  }

  function finish(res) {
    if (res && res.ok) { window.location.reload(); return; }
    show((res && (res.error || res.detail)) || "the change was not saved");
  }

  function inTrash(img) { return !!img.closest('.slot[data-slot="not-a-chromosome"]'); }

  function move(img, label) {
    var fields = [["chromosome", img.dataset.id], ["label", label], ["seen", img.dataset.seen]];
    var first = inTrash(img)
      ? post("/chromosomes/" + img.dataset.id + "/not-chromosome", [["value", "false"]])
      : Promise.resolve({ok: true});
    return first.then(function (r) {
      if (!r.ok) { return r; }
      return post("/cases/" + casePk + "/labels", fields);
    }).then(finish);
  }

  function swap(a, b) {
    if (!a.dataset.label || !b.dataset.label) { show("only two classified chromosomes can be swapped"); return; }
    if (a.dataset.label === b.dataset.label) { return; }
    post("/cases/" + casePk + "/labels", [
      ["chromosome", a.dataset.id], ["label", b.dataset.label], ["seen", a.dataset.seen],
      ["chromosome", b.dataset.id], ["label", a.dataset.label], ["seen", b.dataset.seen]
    ]).then(finish);
  }

  function notChromosome(img) {
    post("/chromosomes/" + img.dataset.id + "/not-chromosome", [["value", "true"]]).then(finish);
  }

  function drop(img, target) {
    var other = target.closest("img.chrom");
    if (other && other !== img && !inTrash(other) && !inTrash(img)) { swap(img, other); return; }
    var slot = target.closest(".slot");
    if (!slot) { return; }
    var name = slot.dataset.slot;
    if (name === "not-a-chromosome") { if (!inTrash(img)) { notChromosome(img); } return; }
    if (name && name !== img.dataset.label) { move(img, name); }
  }

  // ---- drag and drop
  var dragged = null;
  if (editable) {
    app.addEventListener("dragstart", function (e) {
      var img = e.target.closest && e.target.closest("img.chrom");
      if (!img) { return; }
      dragged = img;
      e.dataTransfer.effectAllowed = "move";
      e.dataTransfer.setData("text/plain", img.dataset.id);
    });
    app.addEventListener("dragover", function (e) {
      if (dragged && e.target.closest && e.target.closest(".slot")) { e.preventDefault(); }
    });
    app.addEventListener("dragenter", function (e) {
      var slot = e.target.closest && e.target.closest(".slot");
      if (slot) { slot.classList.add("over"); }
    });
    app.addEventListener("dragleave", function (e) {
      var slot = e.target.closest && e.target.closest(".slot");
      if (slot && !slot.contains(e.relatedTarget)) { slot.classList.remove("over"); }
    });
    app.addEventListener("drop", function (e) {
      e.preventDefault();
      if (!dragged) { return; }
      var img = dragged;
      dragged = null;
      drop(img, e.target);
    });
    app.addEventListener("dragend", function () { dragged = null; });
  }

  // ---- keyboard: select, type the class, Enter
  var selected = null;
  var typed = "";
  function select(img) {
    if (selected) { selected.classList.remove("selected"); }
    selected = img;
    typed = "";
    if (img) { img.classList.add("selected"); img.focus(); show("selected: " + (img.dataset.label || "unclassified") +
      (editable ? " — type its class and Enter" : "")); }
  }
  app.addEventListener("click", function (e) {
    var img = e.target.closest && e.target.closest("img.chrom");
    if (img) { select(img); }
  });
  app.addEventListener("focusin", function (e) {
    var img = e.target.closest && e.target.closest("img.chrom");
    if (img && img !== selected) { select(img); }
  });
  document.addEventListener("keydown", function (e) {
    if (!selected) { return; }
    if (e.target && (e.target.tagName === "INPUT" || e.target.tagName === "TEXTAREA")) { return; }
    var k = e.key;
    if ((k === "ArrowRight" || k === "ArrowLeft") && typed === "") {  // the next / previous chromosome
      var all = Array.prototype.slice.call(app.querySelectorAll("img.chrom"));
      var at = all.indexOf(selected) + (k === "ArrowRight" ? 1 : -1);
      if (at >= 0 && at < all.length) { e.preventDefault(); select(all[at]); }
      return;
    }
    if (!editable) { return; }
    if (k === "Escape") { select(null); box.classList.add("hidden"); return; }
    if (k === "Enter") {
      e.preventDefault();
      var label = typed.toUpperCase();
      if (CLASSES.indexOf(label) < 0) { show("not a class: " + (typed || "(nothing typed)")); typed = ""; return; }
      move(selected, label);
      return;
    }
    if (k === "Backspace") { typed = typed.slice(0, -1); show("class: " + typed); return; }
    if ((k === "n" || k === "N") && typed === "") { notChromosome(selected); return; }
    if (/^[0-9xXyY]$/.test(k)) { typed += k; show("class: " + typed.toUpperCase() + " (Enter to move)"); }
  });
})();
