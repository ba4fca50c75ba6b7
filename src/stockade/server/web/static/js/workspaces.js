// Workspace pages: follow a build's log as it runs.
//
// The page renders the lines stored so far in <section id="build-log">; this
// reads the API's NDJSON stream from the last of them
// (GET /api/v2/workspaces/OWNER/NAME/logs?build=N&after=ID&follow=true, with
// the session cookie) and appends each new line until an {"type": "end"}
// line. Then it shows the final status and fires "build-ended", on which the
// page's htmx poller refreshes the status at once.
//
// On a workspace's page, when another build becomes the latest (a restart's
// start, a build queued from the CLI), the poller brings a head region with a
// new data-latest-build and the log switches to that build.
"use strict";

(() => {
  const MAX_RETRIES = 30;

  const section = document.getElementById("build-log");
  if (!section) return;
  const pre = section.querySelector("pre.log");
  const role = (name) => section.querySelector(`[data-role="${name}"]`);
  let generation = 0; // bumped to stop a follower when another build is followed

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function atBottom() {
    return pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
  }

  function span(text, cls) {
    const el = document.createElement("span");
    if (cls) el.className = cls;
    el.textContent = text;
    return el;
  }

  function append(entry) {
    const follow = atBottom();
    const lines = document.createDocumentFragment();
    if (entry.stage && entry.stage !== section.dataset.stage) {
      section.dataset.stage = entry.stage;
      lines.append(span(`==> ${entry.stage}`, "stage"), "\n");
    }
    const line = span(entry.line, entry.level === "info" ? "" : entry.level);
    if (entry.time) line.title = entry.time;
    lines.append(line, "\n");
    pre.append(lines);
    section.dataset.after = String(entry.id);
    if (follow) pre.scrollTop = pre.scrollHeight;
  }

  function showStatus(status) {
    const holder = role("status");
    if (!holder) return;
    const badge = document.createElement("span");
    badge.className = `badge s-${status.replaceAll("_", "-")}`;
    badge.textContent = status.replaceAll("_", " ");
    holder.replaceChildren(badge);
  }

  function say(text) {
    const state = role("state");
    if (state) state.textContent = text;
  }

  function ended(event) {
    section.dataset.follow = "false";
    showStatus(event.status);
    say(`Build #${event.build_number} ${event.status}.`);
    document.body.dispatchEvent(new CustomEvent("build-ended", { detail: event }));
  }

  async function follow(mine) {
    const base = section.dataset.logUrl;
    for (let attempt = 0; attempt <= MAX_RETRIES && mine === generation; attempt++) {
      if (attempt > 0) await sleep(Math.min(500 * attempt, 5000));
      const query = new URLSearchParams({
        build: section.dataset.build,
        after: section.dataset.after || "0",
        follow: "true",
      });
      let response;
      try {
        response = await fetch(`${base}?${query}`, {
          headers: { Accept: "application/x-ndjson" },
          credentials: "same-origin",
          cache: "no-store",
        });
      } catch (err) {
        continue; // the server restarts, or the network blinked: try again
      }
      if (!response.ok || !response.body) {
        if (response.status >= 500) continue;
        say(`The log cannot be followed (status ${response.status}). Reload the page.`);
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          if (mine !== generation) {
            reader.cancel();
            return;
          }
          buffer += decoder.decode(value, { stream: true });
          let newline;
          while ((newline = buffer.indexOf("\n")) >= 0) {
            const text = buffer.slice(0, newline);
            buffer = buffer.slice(newline + 1);
            if (!text.trim()) continue;
            const event = JSON.parse(text);
            if (event.type === "log") {
              append(event);
            } else if (event.type === "end") {
              ended(event);
              return;
            }
          }
        }
      } catch (err) {
        // The stream broke off mid-way: resume after the last line shown.
      }
    }
    if (mine === generation) say("The log stream stopped. Reload the page to see the rest.");
  }

  function start() {
    generation += 1;
    follow(generation);
  }

  // The workspace's page: its head region (refreshed by the poller) names the
  // latest build and its status. A new latest build is followed instead.
  function checkLatest() {
    const head = document.querySelector("[data-latest-build]");
    if (!head || !section.dataset.buildsUrl) return;
    const latest = head.dataset.latestBuild;
    if (!latest) return;
    if (latest === section.dataset.build) {
      if (section.dataset.follow === "true" && head.dataset.buildStatus) {
        showStatus(head.dataset.buildStatus);
      }
      return;
    }
    section.dataset.build = latest;
    section.dataset.after = "0";
    section.dataset.stage = "";
    pre.replaceChildren();
    const number = role("number");
    if (number) number.textContent = latest;
    const link = role("link");
    if (link) link.setAttribute("href", section.dataset.buildsUrl + latest);
    const details = section.querySelector("details");
    if (details) details.open = true;
    showStatus(head.dataset.buildStatus || "pending");
    say("Following the build as it runs…");
    section.dataset.follow = "true";
    start();
  }

  document.body.addEventListener("htmx:afterSettle", checkLatest);
  document.body.addEventListener("htmx:oobAfterSwap", checkLatest);

  if (section.dataset.follow === "true") start();
})();
