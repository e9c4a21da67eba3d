// hyprjax's chat page: plain JavaScript against the server's own OpenAI API, no build step, no CDN.
// Streams /v1/chat/completions (SSE over fetch), picks the model or an adapter from /v1/models or a
// weighted mix of adapters (lora_adapters + lora_weights), stops a reply (the server aborts the
// request when the stream closes) and regenerates the last one. With `hyprjax serve --api-key`
// the page asks for the key once and keeps it in this browser's localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "hyprjax-api-key";
const state = { messages: [], base: null, adapters: [], controller: null, busy: false };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModels() {
  let response;
  try {
    response = await fetch("v1/models", { headers: headers() });
  } catch (e) {
    status("server unreachable: " + e.message, true);
    return;
  }
  if (response.status === 401) {
    $("key-box").hidden = false;
    status("API key needed", true);
    return;
  }
  if (!response.ok) {
    status(await errorText(response), true);
    return;
  }
  $("key-box").hidden = true;
  const cards = (await response.json()).data;
  const bases = cards.filter((c) => !c.parent);
  state.base = bases.length ? bases[0].id : null;
  state.adapters = cards.filter((c) => c.parent).map((c) => c.id);
  const select = $("model");
  select.replaceChildren();
  for (const c of cards) {
    const option = new Option(c.parent ? c.id + " (adapter)" : c.id, c.id);
    select.append(option);
  }
  const rows = $("mix-rows");
  rows.replaceChildren();
  for (const name of state.adapters) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    Object.assign(input, { type: "number", min: "0", step: "0.1", value: "0" });
    input.dataset.adapter = name;
    label.append(name, input);
    rows.append(label);
  }
  $("mix-toggle").disabled = state.adapters.length === 0;
  if (!state.adapters.length) $("mix-toggle").title = "the server has no adapters (hyprjax serve --lora NAME=PATH)";
  status("ready");
}

function mix() {
  if ($("mix").hidden) return null;
  const weights = {};
  for (const input of $("mix-rows").querySelectorAll("input")) {
    const w = parseFloat(input.value);
    if (w > 0) weights[input.dataset.adapter] = w;
  }
  return Object.keys(weights).length ? weights : null;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  const last = state.messages[state.messages.length - 1];
  $("regenerate").disabled = busy || !last || last.role !== "assistant";
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.messages);
  const body = {
    model: $("model").value || state.base, messages, stream: true,
    temperature: parseFloat($("temperature").value) || 0,
    max_tokens: parseInt($("max-tokens").value, 10) || 512,
  };
  const weights = mix();
  if (weights) {
    body.model = state.base;
    body.lora_adapters = Object.keys(weights);
    body.lora_weights = weights;
  }
  return body;
}

async function reply() {
  const div = bubble("assistant streaming", "");
  const meta = document.createElement("span");
  meta.className = "meta";
  let text = "";
  let finish = null;
  state.controller = new AbortController();
  setBusy(true);
  status("generating…");
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) {
              text += choice.delta.content;
              div.textContent = text;
              div.scrollIntoView({ block: "end" });
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
    meta.textContent = finish === "length" ? "stopped at max tokens" : "";
    status("ready");
  } catch (e) {
    if (e.name === "AbortError") {
      meta.textContent = "stopped";
      status("stopped");
    } else {
      div.classList.add("error");
      meta.textContent = "error: " + e.message;
      status(e.message, true);
    }
  } finally {
    div.classList.remove("streaming");
    div.textContent = text;
    if (meta.textContent) div.append(meta);
    state.controller = null;
    if (text) state.messages.push({ role: "assistant", content: text });
    setBusy(false);
  }
}

function send(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.busy) return;
  $("input").value = "";
  state.messages.push({ role: "user", content: text });
  bubble("user", text);
  reply();
}

function regenerate() {
  if (state.busy) return;
  const last = state.messages[state.messages.length - 1];
  if (!last || last.role !== "assistant") return;
  state.messages.pop();
  const bubbles = $("log").querySelectorAll(".msg.assistant");
  bubbles[bubbles.length - 1].remove();
  reply();
}

$("composer").addEventListener("submit", send);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("regenerate").addEventListener("click", regenerate);
$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("log").replaceChildren();
  setBusy(false);
});
$("mix-toggle").addEventListener("click", () => { $("mix").hidden = !$("mix").hidden; });
$("key-save").addEventListener("click", () => {
  localStorage.setItem(KEY, $("api-key").value.trim());
  loadModels();
});
loadModels();
