// loraswap's WebSocket endpoint from JavaScript: several generations in flight on one
// connection, each streamed by its own id. websocket.html uses it in a browser; it also runs
// under Node (22+, or 20 with --experimental-websocket):
//   node --experimental-websocket examples/ws_client.js

function generateMany(url, requests, onText) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const results = {};
    ws.onopen = () => {
      requests.forEach((request, i) => ws.send(JSON.stringify({ id: `r${i}`, ...request })));
    };
    ws.onmessage = (event) => {
      const msg = JSON.parse(event.data);
      const i = Number(String(msg.id).slice(1));
      if (msg.error) {
        ws.close();
        reject(new Error(msg.error.message));
        return;
      }
      if (msg.text) onText(i, msg.text, msg.model);
      if (msg.done) {
        results[i] = msg.usage;
        if (Object.keys(results).length === requests.length) {
          ws.close();
          resolve(results);
        }
      }
    };
    ws.onerror = () => reject(new Error(`cannot reach ${url}`));
  });
}

function socketUrl(httpUrl, apiKey) {
  const url = httpUrl.replace(/^http/, "ws").replace(/\/$/, "") + "/ws/generate";
  return apiKey ? `${url}?api_key=${encodeURIComponent(apiKey)}` : url;
}

if (typeof window === "undefined") {
  const url = socketUrl(process.env.LORASWAP_URL || "http://localhost:3000",
                        process.env.LORASWAP_API_KEY);
  const question = [{ role: "user", content: "Name three fruits." }];
  const requests = [
    { messages: question, max_tokens: 32, temperature: 0 },  // no model: the base model
    { model: "uppercase", messages: question, max_tokens: 32, temperature: 0 },
  ];
  const texts = ["", ""];
  const models = ["", ""];
  generateMany(url, requests, (i, text, model) => { texts[i] += text; models[i] = model; })
    .then((usage) => {
      requests.forEach((_, i) => console.log(`${models[i]}: ${texts[i]} (${usage[i].completion_tokens} tokens)`));
      process.exit(0);
    })
    .catch((error) => { console.error(error.message); process.exit(1); });
}
