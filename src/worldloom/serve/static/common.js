// worldloom pages: what chat.js and play.js share: the API key (kept in localStorage and sent as
// the Bearer token), API calls whose errors become one readable line, and the page's error line.
"use strict";

const KEY_STORE = "worldloom.apiKey";
const $ = (id) => document.getElementById(id);

function apiKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

// The API key field: filled from localStorage, saved there when changed (emptied: removed).
function keyField(input) {
  input.value = apiKey();
  input.addEventListener("change", () => {
    const key = input.value.trim();
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
  });
}

// One line from an error response: the message of OpenAI's error shape, else the status and text.
async function errorLine(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}: ${text.slice(0, 200)}`;
}

// fetch() with the key and a JSON body; throws Error(one line) unless the answer is 2xx.
async function api(path, { method = "GET", body, signal } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (apiKey()) headers["Authorization"] = "Bearer " + apiKey();
  const response = await fetch(path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await errorLine(response));
  return response;
}

// The page's error line (empty: hidden); a message is cut to its first line.
function showError(message) {
  const line = $("error");
  line.textContent = message ? String(message).split("\n")[0] : "";
  line.hidden = !message;
}

function showStatus(text) {
  $("status").textContent = text;
}
