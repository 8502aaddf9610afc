// The API's document, shown by Swagger UI from the server's own copy of its assets. The document is behind the
// API key like every other route when the server has one: the key typed here (or in the playground, same tab) is
// sent with every request the page makes, the document's included.
"use strict";
const KEY = "logitserve-api-key";
const input = document.getElementById("api-key");
input.value = sessionStorage.getItem(KEY) || "";
input.addEventListener("change", () => {
  sessionStorage.setItem(KEY, input.value.trim());
  location.reload();
});
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  requestInterceptor: (request) => {
    const key = sessionStorage.getItem(KEY);
    if (key) request.headers.Authorization = "Bearer " + key;
    return request;
  },
});
