// The play page: a session of a world run (/v1/worlds/{model}/sessions) started from a seed; each
// action (a key, a button, or the model's own policy: "agent") is one step whose JSON answer is
// shown, then the imagined frame (and the real one, unless imagination only) is loaded as a PNG.
"use strict";

const world = decodeURIComponent(location.pathname.split("/").filter(Boolean)[1] || "");
const KEYS = { ArrowLeft: "left", ArrowRight: "right", ArrowUp: "forward", " ": "toggle", p: "pickup", d: "drop", Enter: "done" };
const KEY_NAMES = { ArrowLeft: "←", ArrowRight: "→", ArrowUp: "↑", " ": "Space", p: "P", d: "D", Enter: "Enter" };
let session = null;           // the session as /sessions answered it
let chain = Promise.resolve(); // steps run one after another
let queued = 0;               // steps waiting in the chain
let agentOn = false;

const base = () => `/v1/worlds/${encodeURIComponent(world)}/sessions`;

async function loadWorld() {
  $("world").textContent = world;
  document.title = "worldloom play: " + world;
  const info = (await (await api("/v1/worlds")).json()).data.find((w) => w.id === world);
  if (!info) throw new Error(`${world} is not a world run on this server`);
  $("mode").textContent = "";
  info.modes.forEach((mode, i) => {
    const option = new Option(i === 0 ? `${mode} (best)` : mode, mode);
    $("mode").append(option);
  });
  const keyOf = Object.fromEntries(Object.entries(KEYS).map(([k, a]) => [a, k]));
  for (const action of info.actions) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = action + (keyOf[action] ? ` (${KEY_NAMES[keyOf[action]]})` : "");
    button.setAttribute("aria-label", "Action: " + action);
    button.dataset.action = action;
    button.addEventListener("click", (e) => { unfocus(e); act(action); });
    $("actions").append(button);
  }
  $("keys").textContent = "Keys: " + info.actions.filter((a) => keyOf[a]).map((a) => `${KEY_NAMES[keyOf[a]]} ${a}`).join(", ");
  for (const id of ["agent", "agent-step"]) {
    $(id).disabled = !info.policy;
    if (!info.policy) $(id).title = "this world run was trained without a policy";
  }
}

async function newSession(event) {
  if (event) event.preventDefault();
  stopAgent();
  if (session) api(`${base()}/${session.id}`, { method: "DELETE" }).catch(() => {});
  session = null;
  showError("");
  const body = { mode: $("mode").value, imagination_only: $("imagine-only").checked };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  try {
    session = await (await api(base(), { method: "POST", body })).json();
  } catch (e) { showError(e.message); return; }
  $("mission").textContent = session.mission;
  $("step").textContent = session.step;
  $("last-action").textContent = "none";
  $("match").textContent = "";
  $("imagined-info").textContent = "the real first view";
  $("real-info").textContent = "the first view";
  showReal(!session.imagination_only);
  showStatus(`session ${session.id}: seed ${session.seed}, mode ${session.mode}`);
  await loadFrames(session.step).catch((e) => showError(e.message));
}

function showReal(on) {
  $("real-figure").hidden = !on;
  $("real-off").hidden = on;
}

// Load the session's frames as PNG (fetch: the API key travels) into the images.
async function loadFrames(step) {
  const which = session.imagination_only ? ["imagined"] : ["imagined", "real"];
  await Promise.all(which.map(async (w) => {
    const blob = await (await api(`${base()}/${session.id}/frame.png?which=${w}`)).blob();
    const img = $(w);
    const old = img.src;
    img.src = URL.createObjectURL(blob);
    await img.decode().catch(() => {});
    img.dataset.step = step;
    if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  }));
}

function outcome(part) {
  if (!part) return "";
  const ended = part.terminated ? "ended (done)" : part.truncated ? "ended (step limit)" : "going on";
  return `reward ${part.reward.toFixed(2)}, ${ended}`;
}

async function step(action) {
  const id = session.id;
  const body = { action, imagination_only: $("imagine-only").checked };
  const s = await (await api(`${base()}/${id}/step`, { method: "POST", body })).json();
  if (!session || session.id !== id) return null; // a new session started meanwhile
  session.imagination_only = s.imagination_only;
  $("step").textContent = s.step;
  $("last-action").textContent = `${s.action.name} (${s.action.by})`;
  $("imagined-info").textContent = outcome(s.imagined);
  showReal(!s.imagination_only);
  if (s.real) $("real-info").textContent = outcome(s.real);
  else if (!s.imagination_only) $("real-info").textContent = "the real episode has ended";
  $("match").textContent = s.real ? (s.match ? "· imagined = real" : "· imagined ≠ real") : "";
  await loadFrames(s.step);
  return s;
}

// Queue one step (at most 4 waiting); resolves to its answer, or null when it was not taken.
function act(action) {
  if (!session || queued >= 4) return Promise.resolve(null);
  queued += 1;
  const run = chain.then(() => (session ? step(action) : null))
    .catch((e) => { showError(e.message); stopAgent(); return null; })
    .finally(() => { queued -= 1; });
  chain = run;
  return run;
}

async function agentPlay() {
  if (agentOn) { stopAgent(); return; }
  agentOn = true;
  $("agent").textContent = "Stop the agent";
  $("agent").setAttribute("aria-pressed", "true");
  showStatus("the agent plays (its own policy, on what it imagines)");
  while (agentOn) {
    const s = await act("agent");
    if (!s) break;
    if (s.imagined.terminated || s.imagined.truncated) { showStatus(`the agent ended the imagined episode at step ${s.step}`); break; }
  }
  stopAgent();
}

function stopAgent() {
  agentOn = false;
  $("agent").textContent = "Let the agent play";
  $("agent").setAttribute("aria-pressed", "false");
}

// After a mouse click, the keys go back to playing (a focused button would take Space and Enter);
// a button pressed from the keyboard keeps its focus.
function unfocus(event) {
  if (event.detail > 0) event.currentTarget.blur();
}

function onKey(event) {
  const t = event.target;
  const typing = (t.tagName === "INPUT" && t.type !== "checkbox") || t.tagName === "SELECT" || t.tagName === "TEXTAREA";
  const pressing = (t.tagName === "BUTTON" || t.type === "checkbox") && (event.key === " " || event.key === "Enter");
  if (typing || pressing || event.ctrlKey || event.metaKey || event.altKey) return;
  const action = KEYS[event.key.length === 1 ? event.key.toLowerCase() : event.key];
  const button = action && document.querySelector(`#actions button[data-action="${action}"]`);
  if (!button) return;
  event.preventDefault();
  act(action);
}

async function init() {
  keyField($("api-key"));
  $("new").addEventListener("submit", newSession);
  $("agent").addEventListener("click", (e) => { unfocus(e); agentPlay(); });
  $("agent-step").addEventListener("click", (e) => { unfocus(e); act("agent"); });
  document.addEventListener("keydown", onKey);
  try {
    await loadWorld();
  } catch (e) { showError(e.message); return; }
  await newSession();
}

init();
