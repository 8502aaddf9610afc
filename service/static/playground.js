// The playground: score a text (or a conversation in the chat template) with this server's public API and show
// every token coloured by its log-probability or rank, its top alternatives on hover, and the perplexity.
// Plain JavaScript, no dependencies: the page works without any network beyond this server.
"use strict";

const TOP_K = 5;
const CONTEXT_TOKENS = 4;   // tokens decoded before a token so that its text (leading space, UTF-8 bytes) is right
const DECODE_BLOCK = 32;    // tokens whose texts come from one chain of decodes sharing a start
const PARALLEL = 6;         // concurrent /detokenize calls
const RED_AT = -10;         // log-probability (nats) drawn fully red; 0 is fully green

const $ = (id) => document.getElementById(id);
const state = {
  generation: 0,            // bumps on every scoring; answers of an older one are dropped
  supportsRanks: null,      // whether /v1/logits accepts target_ranks (null: not asked yet)
  decoded: new Map(),       // "id,id,..." -> text
  result: null,
};

// ------------------------------------------------------------------------------------------------- the API
class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

async function api(path, body) {
  const headers = { "content-type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.authorization = "Bearer " + key;
  const init = body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const text = await response.text();
  let payload = null;
  try { payload = JSON.parse(text); } catch (_) { /* not JSON: reported below */ }
  if (!response.ok) {
    const err = payload && payload.error;
    const message = err && err.message ? err.message : `${response.status} ${response.statusText}: ${text.slice(0, 200)}`;
    throw new ApiError(response.status, message, err ? err.param : null);
  }
  return payload;
}

// /v1/logits with every row's target log-prob and top-k; with target_ranks where the server has them.
async function scoreRows(inputs) {
  const body = { ...inputs, return_logits: "all", logits: false, target_logprobs: true, top_k: TOP_K };
  if (state.supportsRanks !== false) {
    try {
      const answer = await api("v1/logits", { ...body, target_ranks: true });
      state.supportsRanks = true;
      return answer.data[0];
    } catch (e) {
      // A server without target_ranks refuses the unknown field (422); anything else is a real error.
      if (!(e instanceof ApiError && e.status === 422 && /target_ranks/.test((e.param || "") + e.message))) throw e;
      state.supportsRanks = false;
    }
  }
  return (await api("v1/logits", body)).data[0];
}

async function decode(ids) {
  if (ids.length === 0) return "";
  const key = ids.join(",");
  if (!state.decoded.has(key)) {
    state.decoded.set(key, api("detokenize", { tokens: ids }).then((r) => r.prompt));
  }
  try {
    return await state.decoded.get(key);
  } catch (e) {
    state.decoded.delete(key);
    throw e;
  }
}

async function inParallel(jobs, limit) {
  let next = 0;
  const worker = async () => { while (next < jobs.length) await jobs[next++](); };
  await Promise.all(Array.from({ length: Math.min(limit, jobs.length) }, worker));
}

function commonPrefixLength(a, b) {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  return i;
}

// The text each token adds to the decoded text before it: decode(start..i+1) minus decode(start..i), with a start
// a few tokens back, shared by a block of tokens so that each token costs one decode.
async function tokenTexts(ids) {
  const texts = new Array(ids.length).fill("");
  const jobs = [];
  for (let block = 0; block < ids.length; block += DECODE_BLOCK) {
    jobs.push(async () => {
      const start = Math.max(0, block - CONTEXT_TOKENS);
      const end = Math.min(ids.length, block + DECODE_BLOCK);
      let previous = await decode(ids.slice(start, block));
      for (let i = block; i < end; i++) {
        const current = await decode(ids.slice(start, i + 1));
        texts[i] = current.slice(commonPrefixLength(previous, current));
        previous = current;
      }
    });
  }
  await inParallel(jobs, PARALLEL);
  return texts;
}

// The text an alternative token would have added at position i (after the tokens before i).
async function alternativeText(ids, i, altId) {
  const before = ids.slice(Math.max(0, i - CONTEXT_TOKENS), i);
  const head = await decode(before);
  const whole = await decode(before.concat([altId]));
  return whole.slice(commonPrefixLength(head, whole));
}

// ------------------------------------------------------------------------------------------------ scoring
// Rank of the token among the vocabulary (1 + the number of tokens scored strictly higher) when the top-k shows it:
// {rank} when known, {rank: null, label: ">k"} when it is below the top k.
function rankFromTopK(tokenId, logprob, topIds, topLogprobs) {
  let reference = logprob;
  const at = tokenId === null ? -1 : topIds.indexOf(tokenId);
  if (at >= 0) reference = topLogprobs[at];
  else if (!(reference >= Math.min(...topLogprobs))) return { rank: null, label: ">" + topIds.length };
  const rank = 1 + topLogprobs.filter((v) => v > reference).length;
  return { rank, label: String(rank) };
}

function buildTokens(ids, row) {
  // Row p scores the token at p + 1: token i's numbers are row i - 1's.
  const n = row.num_tokens;
  const tokens = [];
  for (let i = 0; i < n; i++) {
    const id = ids ? ids[i] : null;
    if (i === 0) { tokens.push({ i, id, first: true }); continue; }
    const p = i - 1;
    const logprob = row.target_logprobs[p];
    const topIds = row.top_k.ids[p];
    const topLogprobs = row.top_k.logprobs[p];
    let rank;
    if (row.target_ranks) {
      rank = { rank: row.target_ranks[p], label: String(row.target_ranks[p]), exact: true };
    } else {
      rank = rankFromTopK(id, logprob, topIds, topLogprobs);
    }
    tokens.push({ i, id, logprob, topIds, topLogprobs, ...rank });
  }
  return tokens;
}

function perplexity(tokens) {
  const lps = tokens.filter((t) => !t.first).map((t) => t.logprob);
  if (lps.length === 0) return { ppl: null, mean: null };
  const mean = lps.reduce((a, b) => a + b, 0) / lps.length;
  return { ppl: Math.exp(-mean), mean };
}

// ------------------------------------------------------------------------------------------------- colours
function logprobColour(lp) {
  const x = Math.max(0, Math.min(1, 1 - lp / RED_AT));   // 1 at log-prob 0, 0 at RED_AT and below
  return `hsl(${Math.round(120 * x)}, 75%, 80%)`;
}

// GLTR's buckets when the server gives exact ranks (top 10, 100, 1000, beyond); top-1, top-k, beyond otherwise.
function rankBuckets(exact) {
  if (exact) {
    return [
      { upTo: 10, colour: "#b7efb2", label: "top 10" },
      { upTo: 100, colour: "#fff2a8", label: "top 100" },
      { upTo: 1000, colour: "#ffc1b3", label: "top 1000" },
      { upTo: Infinity, colour: "#e3c8ff", label: "beyond" },
    ];
  }
  return [
    { upTo: 1, colour: "#b7efb2", label: "rank 1" },
    { upTo: TOP_K, colour: "#fff2a8", label: `rank 2–${TOP_K}` },
    { upTo: Infinity, colour: "#ffc1b3", label: `below top ${TOP_K}` },
  ];
}

function rankColour(t, buckets) {
  const rank = t.rank === null ? Infinity : t.rank;
  return buckets.find((b) => rank <= b.upTo).colour;
}

function colourMode() {
  return document.querySelector("input[name=colour]:checked").value;
}

// ------------------------------------------------------------------------------------------------- drawing
function visible(text) {
  // Whitespace a reader would not see: newlines as a return sign (then the newline), tabs as an arrow.
  const out = document.createDocumentFragment();
  for (const part of text.split(/(\n|\t)/)) {
    if (part === "\n" || part === "\t") {
      const span = document.createElement("span");
      span.className = "ws";
      span.textContent = part === "\n" ? "↵" : "→";
      out.appendChild(span);
      if (part === "\n") out.appendChild(document.createTextNode("\n"));
    } else if (part) {
      out.appendChild(document.createTextNode(part));
    }
  }
  return out;
}

function drawLegend() {
  const legend = $("legend");
  legend.replaceChildren();
  if (colourMode() === "logprob") {
    const stops = [0, 0.25, 0.5, 0.75, 1].map((f) => logprobColour(f * RED_AT)).join(", ");
    legend.innerHTML = `<span>log-prob 0</span><span class="scale" style="background: linear-gradient(to right, ${stops})"></span><span>${RED_AT} and below</span>`;
  } else {
    const exact = state.result ? state.result.tokens.some((t) => t.exact) : state.supportsRanks === true;
    for (const b of rankBuckets(exact)) {
      const s = document.createElement("span");
      s.className = "swatch";
      s.style.background = b.colour;
      s.textContent = b.label;
      legend.appendChild(s);
    }
    if (!exact) {
      const note = document.createElement("span");
      note.textContent = `(ranks from the top ${TOP_K}: this server does not report target_ranks)`;
      legend.appendChild(note);
    }
  }
}

function draw() {
  drawLegend();
  const box = $("tokens");
  box.replaceChildren();
  const result = state.result;
  if (!result) {
    for (const id of ["token-count", "perplexity", "mean-logprob"]) $(id).textContent = "–";
    return;
  }
  const mode = colourMode();
  const buckets = rankBuckets(result.tokens.some((t) => t.exact));
  for (const t of result.tokens) {
    const span = document.createElement("span");
    span.className = "tok" + (t.first ? " first" : "");
    span.tabIndex = 0;
    span.dataset.index = t.i;
    if (t.id !== null) span.dataset.id = t.id;
    span.dataset.text = result.texts ? result.texts[t.i] : "";
    if (!t.first) {
      span.dataset.logprob = t.logprob;
      span.dataset.rank = t.label;
      span.style.background = mode === "rank" ? rankColour(t, buckets) : logprobColour(t.logprob);
    }
    span.appendChild(visible(result.texts ? result.texts[t.i] : "▯"));
    box.appendChild(span);
  }
  const { ppl, mean } = perplexity(result.tokens);
  $("token-count").textContent = result.tokens.length;
  $("perplexity").textContent = ppl === null ? "–" : ppl.toFixed(2);
  $("mean-logprob").textContent = mean === null ? "–" : mean.toFixed(3);
}

function formatProb(lp) {
  const p = Math.exp(lp);
  if (p >= 0.001) return (100 * p).toFixed(1) + "%";
  return p.toExponential(1).replace("e", "×10^");
}

// A token's text for the tooltip: escapes for control characters and a visible sign for spaces.
function shown(text) {
  return JSON.stringify(text).slice(1, -1).replace(/ /g, "␣");
}

function cell(text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

async function showTip(span) {
  const result = state.result;
  const tip = $("tip");
  if (!tip.hidden && tip.dataset.index === span.dataset.index) return;  // moved inside the same token
  const t = result.tokens[Number(span.dataset.index)];
  const generation = state.generation;
  tip.replaceChildren();
  delete tip.dataset.ready;
  tip.dataset.index = span.dataset.index;
  const title = document.createElement("div");
  const tok = document.createElement("span");
  tok.className = "tiptok";
  tok.textContent = result.texts ? shown(result.texts[t.i]) : "?";
  title.append(tok, document.createTextNode(t.id !== null ? `  id ${t.id}` : ""));
  const facts = document.createElement("div");
  facts.className = "facts";
  if (t.first) {
    facts.textContent = "the first token: nothing before it predicts it";
    tip.append(title, facts);
  } else {
    facts.textContent = `p ${formatProb(t.logprob)} · log-prob ${t.logprob.toFixed(3)} · rank ${t.label}`;
    const table = document.createElement("table");
    const head = document.createElement("tr");
    for (const h of ["top " + t.topIds.length, "p", "log-prob", ""]) {
      const th = document.createElement("th");
      th.textContent = h;
      head.appendChild(th);
    }
    table.appendChild(head);
    const rows = t.topIds.map((altId, j) => {
      const tr = document.createElement("tr");
      tr.className = "alternative" + (altId === t.id ? " actual" : "");
      tr.dataset.id = altId;
      tr.dataset.logprob = t.topLogprobs[j];
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = Math.max(1, Math.round(80 * Math.exp(t.topLogprobs[j]))) + "px";
      const barCell = document.createElement("td");
      barCell.appendChild(bar);
      tr.append(cell("…", "alt"), cell(formatProb(t.topLogprobs[j])), cell(t.topLogprobs[j].toFixed(3)), barCell);
      table.appendChild(tr);
      return tr;
    });
    tip.append(title, facts, table);
    if (result.ids) {
      // Alternatives' texts in the context of the tokens before: a few decodes, cached.
      Promise.all(t.topIds.map((altId) => alternativeText(result.ids, t.i, altId))).then((texts) => {
        if (generation !== state.generation) return;
        texts.forEach((text, j) => { rows[j].firstChild.textContent = shown(text); });
        tip.dataset.ready = "1";
      }).catch(() => {});
    } else {
      rows.forEach((tr) => { tr.firstChild.textContent = "id " + tr.dataset.id; });
      tip.dataset.ready = "1";
    }
  }
  const r = span.getBoundingClientRect();
  tip.hidden = false;
  const left = Math.min(window.scrollX + r.left, window.scrollX + document.documentElement.clientWidth - tip.offsetWidth - 8);
  tip.style.left = Math.max(8, left) + "px";
  tip.style.top = window.scrollY + r.bottom + 6 + "px";
}

function hideTip() {
  const tip = $("tip");
  tip.hidden = true;
  delete tip.dataset.ready;
  delete tip.dataset.index;
}

// ------------------------------------------------------------------------------------------------- flow
function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function showNotice(message) {
  $("notice").textContent = message;
  $("notice").hidden = !message;
}

function conversation() {
  return Array.from(document.querySelectorAll(".message")).map((m) => ({
    role: m.querySelector("select").value,
    content: m.querySelector("textarea").value,
  }));
}

async function scoreText(text) {
  const ids = (await api("tokenize", { prompt: text, add_special_tokens: true })).tokens;
  const row = await scoreRows({ inputs: text });
  if (row.num_tokens !== ids.length) {
    throw new Error(`/tokenize gave ${ids.length} tokens and /v1/logits scored ${row.num_tokens}`);
  }
  return { ids, row, texts: await tokenTexts(ids) };
}

async function scoreConversation(messages) {
  const row = await scoreRows({ messages: [messages] });
  // The rendered conversation's token ids, where /tokenize takes messages as vLLM's does; without them the page
  // still shows every position's numbers, only not the tokens' texts.
  let ids = null;
  try {
    ids = (await api("tokenize", { messages, add_generation_prompt: false })).tokens;
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
  }
  if (ids && ids.length !== row.num_tokens) ids = null;
  return { ids, row, texts: ids ? await tokenTexts(ids) : null };
}

async function run() {
  const generation = ++state.generation;
  const mode = document.querySelector("input[name=mode]:checked").value;
  $("status").textContent = "scoring…";
  document.body.dataset.busy = "1";
  try {
    let scored;
    if (mode === "text") {
      const text = $("text").value;
      if (!text) { state.result = null; draw(); showError(""); return; }
      scored = await scoreText(text);
    } else {
      scored = await scoreConversation(conversation());
    }
    if (generation !== state.generation) return;
    const tokens = buildTokens(scored.ids, scored.row);
    state.result = { ...scored, tokens };
    showError("");
    showNotice(scored.texts ? "" :
      "This server cannot tokenize a conversation (/tokenize with messages), so the tokens' texts are not shown; " +
      "hover a box for its numbers.");
    draw();
    $("status").textContent = "";
  } catch (e) {
    if (generation !== state.generation) return;
    state.result = null;
    draw();
    showNotice("");
    showError(e.message);
    $("status").textContent = "";
  } finally {
    if (generation === state.generation) delete document.body.dataset.busy;
  }
}

let timer = null;
function runSoon() {
  clearTimeout(timer);
  timer = setTimeout(run, 400);
}

function addMessage(role, content) {
  const row = document.createElement("div");
  row.className = "message";
  const select = document.createElement("select");
  for (const r of ["system", "user", "assistant"]) {
    const o = document.createElement("option");
    o.value = o.textContent = r;
    select.appendChild(o);
  }
  select.value = role;
  const text = document.createElement("textarea");
  text.rows = 2;
  text.value = content;
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "remove";
  remove.textContent = "×";
  remove.title = "remove this message";
  remove.addEventListener("click", () => { row.remove(); runSoon(); });
  select.addEventListener("change", runSoon);
  text.addEventListener("input", runSoon);
  row.append(select, text, remove);
  $("messages").appendChild(row);
}

async function showModel() {
  try {
    const models = await api("v1/models");
    $("model-name").textContent = models.data[0].id;
  } catch (e) {
    $("model-name").textContent = e.status === 401 ? "(enter the API key)" : "?";
  }
}

function init() {
  $("api-key").value = sessionStorage.getItem("logitserve-api-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("logitserve-api-key", $("api-key").value.trim());
    state.decoded.clear();
    showModel();
    run();
  });
  $("text").addEventListener("input", runSoon);
  $("analyze").addEventListener("click", run);
  for (const input of document.querySelectorAll("input[name=mode]")) {
    input.addEventListener("change", () => {
      const text = input.value === "text";
      $("text").hidden = !text;
      $("conversation").hidden = text;
      run();
    });
  }
  for (const input of document.querySelectorAll("input[name=colour]")) input.addEventListener("change", draw);
  addMessage("user", "What is the capital of France?");
  addMessage("assistant", "The capital of France is Paris.");
  $("add-message").addEventListener("click", () => addMessage("user", ""));

  const box = $("tokens");
  box.addEventListener("mouseover", (e) => { const s = e.target.closest(".tok"); if (s) showTip(s); });
  box.addEventListener("focusin", (e) => { const s = e.target.closest(".tok"); if (s) showTip(s); });
  box.addEventListener("mouseleave", hideTip);
  box.addEventListener("focusout", hideTip);
  drawLegend();
  showModel();
  run();
}

document.addEventListener("DOMContentLoaded", init);
