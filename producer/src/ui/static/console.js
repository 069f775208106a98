// bulkops operator console: live progress over server-sent events, and regions that
// refresh themselves in place. Every page works without this script (a <noscript>
// refresh stands in for it). Vendored, dependency-free, no build step.
(function () {
  'use strict';

  function setText(id, text) {
    var el = document.getElementById(id);
    if (el && text !== undefined && el.textContent !== String(text)) {
      el.textContent = text;
    }
  }

  // A batch page: follow its progress until it completes, then reload once so the
  // tables (items, reasons, dead letters) show the final state.
  var live = document.querySelector('[data-live]');
  if (live && window.EventSource && live.getAttribute('data-state') !== 'completed') {
    var source = new EventSource(live.getAttribute('data-live'));
    source.addEventListener('progress', function (e) {
      var p;
      try { p = JSON.parse(e.data); } catch (err) { return; }
      var bar = document.getElementById('progress');
      if (bar) { bar.max = Math.max(p.total, 1); bar.value = p.done; }
      setText('progress-text', p.done.toLocaleString('en-US') + ' / ' +
        p.total.toLocaleString('en-US') + ' (' + p.pct + ')');
      setText('rate', p.rate);
      setText('eta', p.eta);
      var badge = document.querySelector('h1 .state');
      if (badge) {
        badge.textContent = p.state;
        badge.className = 'state state-' + p.state;
        badge.setAttribute('data-state', p.state);
      }
      Object.keys(p.counts || {}).forEach(function (k) { setText('count-' + k, p.counts[k]); });
      if (p.state === 'completed') {
        source.close();
        window.location.reload();
      }
    });
  }

  // Regions marked data-refresh="N" are fetched again every N seconds and replaced by
  // the same region of the fresh page.
  Array.prototype.forEach.call(document.querySelectorAll('[data-refresh]'), function (region) {
    var secs = parseInt(region.getAttribute('data-refresh'), 10) || 10;
    var id = region.id;
    if (!id || !window.fetch || !window.DOMParser) { return; }
    window.setInterval(function () {
      if (document.hidden) { return; }
      fetch(window.location.href, { credentials: 'same-origin', headers: { 'Accept': 'text/html' } })
        .then(function (r) {
          if (r.redirected || !r.ok) { throw new Error('refresh failed'); }
          return r.text();
        })
        .then(function (html) {
          var fresh = new DOMParser().parseFromString(html, 'text/html').getElementById(id);
          var current = document.getElementById(id);
          if (fresh && current) { current.replaceWith(fresh); }
        })
        .catch(function () { /* keep what is shown; the next round tries again */ });
    }, secs * 1000);
  });
})();
