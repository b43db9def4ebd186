// Progressive enhancement for a training run's page: while the run is active, fetch its live
// section every two seconds and swap it in. Without JavaScript the page refreshes itself instead.
(function () {
  "use strict";
  function poll() {
    var live = document.getElementById("live");
    if (!live || live.dataset.active !== "true") return;
    fetch(live.dataset.live, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) {
        if (r.redirected || !r.ok) throw new Error("status " + r.status);
        return r.text();
      })
      .then(function (html) {
        var holder = document.createElement("div");
        holder.innerHTML = html;
        var fresh = holder.querySelector("#live");
        if (fresh) live.replaceWith(fresh);
        setTimeout(poll, 2000);
      })
      .catch(function () { setTimeout(poll, 5000); });
  }
  setTimeout(poll, 2000);
})();
