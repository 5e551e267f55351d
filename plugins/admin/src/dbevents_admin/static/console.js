// The console's only script: the redeliver buttons and the live tail. Values
// are only ever set with textContent, so nothing from an event becomes markup.
"use strict";

async function api(path, options) {
  const response = await fetch(path, Object.assign({
    credentials: "same-origin",
    headers: {"Content-Type": "application/json"},
  }, options || {}));
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

function setStatus(id, text) {
  document.querySelectorAll("[data-status-of]").forEach((cell) => {
    if (cell.dataset.statusOf === id) {
      cell.textContent = text;
      cell.className = "status " + text.split(" ")[0];
    }
  });
}

async function redeliver(button) {
  const id = button.dataset.redeliver;
  button.disabled = true;
  try {
    await api("/api/events/" + encodeURIComponent(id) + "/redeliver",
              {method: "POST", body: "{}"});
    setStatus(id, "pending");
    // Follow the event until it is finished again.
    for (;;) {
      await new Promise((resolve) => setTimeout(resolve, 500));
      const ev = await api("/api/events/" + encodeURIComponent(id));
      setStatus(id, ev.status);
      if (ev.status === "delivered" || ev.status === "failed") break;
    }
  } catch (err) {
    setStatus(id, "error: " + err.message);
  } finally {
    button.disabled = false;
  }
}

async function refreshTail(body) {
  try {
    const page = await api("/api/events?limit=50");
    const rows = page.events.map((ev) => {
      const tr = document.createElement("tr");
      for (const value of [ev.updated_at, ev.trigger, ev.type, ev.database + "." + ev.table,
                           ev.docId, ev.status, ev.attempts, ev.last_error]) {
        const td = document.createElement("td");
        td.textContent = value === null ? "" : String(value);
        tr.appendChild(td);
      }
      tr.children[5].className = "status " + ev.status;
      return tr;
    });
    body.replaceChildren(...rows);
  } catch (err) {
    body.dataset.error = err.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-redeliver]").forEach((button) => {
    button.addEventListener("click", () => redeliver(button));
  });
  const tail = document.getElementById("tail");
  if (tail) {
    refreshTail(tail);
    setInterval(() => refreshTail(tail), 2000);
  }
});
