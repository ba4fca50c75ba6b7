// Makes xterm.js 6 work under the dashboard's CSP (default-src 'self', so no
// inline styles) without weakening it. Loaded before xterm, on the terminal
// page only.
//
// xterm writes its theme, its cell dimensions and its scrollbar into <style>
// elements it creates (DomRenderer, Viewport, the scrollable element), and
// sets 24-bit cell colours with setAttribute("style", ...). The CSP refuses
// both: the terminal then has no colours and a broken layout, and every
// refusal is a console violation. What the CSP does not govern is the CSSOM,
// so here:
// - a <style> element created by script is an <adopted-style> element whose
//   text goes into a constructable style sheet (new CSSStyleSheet(),
//   replaceSync), adopted by the document while the element is in it;
// - setAttribute("style", text) sets element.style.cssText instead.
"use strict";
(() => {
  if (!("adoptedStyleSheets" in Document.prototype) || window.customElements?.get("adopted-style")) return;

  class AdoptedStyle extends HTMLElement {
    constructor() {
      super();
      this._sheet = new CSSStyleSheet();
      this._text = "";
    }

    connectedCallback() {
      const doc = this.ownerDocument;
      if (!doc.adoptedStyleSheets.includes(this._sheet)) {
        doc.adoptedStyleSheets = [...doc.adoptedStyleSheets, this._sheet];
      }
    }

    disconnectedCallback() {
      const doc = this.ownerDocument;
      doc.adoptedStyleSheets = doc.adoptedStyleSheets.filter((sheet) => sheet !== this._sheet);
    }

    // What code written for a <style> element reads and writes.
    get sheet() { return this._sheet; }
    get textContent() { return this._text; }
    set textContent(value) {
      this._text = value == null ? "" : String(value);
      this._sheet.replaceSync(this._text);
    }
    get innerText() { return this._text; }
    set innerText(value) { this.textContent = value; }
    get innerHTML() { return this._text; }
    set innerHTML(value) { this.textContent = value; }
    get media() { return this._sheet.media.mediaText; }
    set media(value) { this._sheet.media.mediaText = String(value); }
    get type() { return "text/css"; }
    set type(value) { /* always CSS */ }
    get disabled() { return this._sheet.disabled; }
    set disabled(value) { this._sheet.disabled = Boolean(value); }
  }
  customElements.define("adopted-style", AdoptedStyle);

  const createElement = Document.prototype.createElement;
  Document.prototype.createElement = function (tagName, options) {
    if (typeof tagName === "string" && tagName.toLowerCase() === "style") {
      return createElement.call(this, "adopted-style");
    }
    return createElement.call(this, tagName, options);
  };

  const setAttribute = Element.prototype.setAttribute;
  Element.prototype.setAttribute = function (name, value) {
    if (typeof name === "string" && name.toLowerCase() === "style" && this.style) {
      this.style.cssText = String(value);
      return;
    }
    setAttribute.call(this, name, value);
  };
})();
