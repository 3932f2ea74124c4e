// Progressive: refreshes the domain page's job rows in place while a job runs. Every page
// works without it.
(function () {
  const body = document.getElementById("jobs");
  if (!body) return;
  const url = body.dataset.refresh;
  async function refresh() {
    if (!body.querySelector("tr.running")) return;
    try {
      const r = await fetch(url, { credentials: "same-origin" });
      // Sent to sign in (the session ended): show that page, not it inside the table.
      if (r.redirected) { window.location.reload(); return; }
      if (r.ok) body.innerHTML = await r.text();
    } catch (_) { /* the next tick tries again */ }
  }
  setInterval(refresh, 3000);
})();
