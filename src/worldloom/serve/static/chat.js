// The chat page: a text model from /v1/models, its answer streamed (server-sent events read from
// fetch()) from /v1/chat/completions (runs with a chat template: the conversation so far is sent)
// or /v1/completions (the others: the text is continued); Stop aborts the request, which frees
// the model's row on the server.
"use strict";

let models = {};      // id -> model card (text runs)
let history = [];     // chat messages so far
let controller = null; // the running request's AbortController

async function loadModels() {
  const data = (await (await api("/v1/models")).json()).data;
  const select = $("model");
  const chosen = select.value;
  select.textContent = "";
  models = {};
  for (const m of data.filter((m) => m.kind === "text")) {
    models[m.id] = m;
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = `${m.id} (${m.chat ? "chat" : "completions"})`;
    select.append(option);
  }
  if (chosen in models) select.value = chosen;
  const nav = $("worlds");
  nav.textContent = "";
  for (const w of data.filter((m) => m.kind === "world")) {
    const link = document.createElement("a");
    link.href = "/play/" + encodeURIComponent(w.id);
    link.textContent = "Play " + w.id;
    nav.append(link, " ");
  }
  showEndpoint();
}

function showEndpoint() {
  const m = models[$("model").value];
  $("endpoint").textContent = !m ? "This server has no text model."
    : m.chat ? "POST /v1/chat/completions (the run's chat template)"
    : "POST /v1/completions (this run has no chat template: it continues your text)";
  $("send").disabled = !m || controller !== null;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// The parsed data of each server-sent event of a response, until "data: [DONE]".
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function request(m, text) {
  const body = { model: m.id, stream: true, temperature: Number($("temperature").value) };
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  if (!m.chat) return ["/v1/completions", { ...body, prompt: text }];
  return ["/v1/chat/completions", { ...body, messages: [...history, { role: "user", content: text }] }];
}

async function send(event) {
  event.preventDefault();
  const m = models[$("model").value];
  const text = $("prompt").value;
  if (!m || !text.trim() || controller) return;
  showError("");
  const [path, body] = request(m, text);
  addMessage("user", text);
  $("prompt").value = "";
  const out = addMessage("assistant", "");
  controller = new AbortController();
  setBusy(true);
  showStatus("streaming…");
  let finish = null;
  try {
    const response = await api(path, { method: "POST", body, signal: controller.signal });
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      out.textContent += m.chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    showStatus(`done (finish_reason: ${finish || "none"})`);
  } catch (e) {
    if (e.name === "AbortError") showStatus("stopped");
    else { showError(e.message); showStatus("failed"); }
  } finally {
    if (m.chat && out.textContent) history.push({ role: "user", content: text }, { role: "assistant", content: out.textContent });
    controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("stop").disabled = !busy;
  $("send").disabled = busy || !models[$("model").value];
}

function init() {
  keyField($("api-key"));
  $("api-key").addEventListener("change", () => loadModels().then(() => showError("")).catch((e) => showError(e.message)));
  $("model").addEventListener("change", showEndpoint);
  $("ask").addEventListener("submit", send);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => { history = []; $("log").textContent = ""; showStatus(""); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
  });
  loadModels().catch((e) => showError(e.message));
}

init();
