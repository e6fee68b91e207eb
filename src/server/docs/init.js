// Swagger UI for this server's OpenAPI document, from the files served beside this one.
// A file of its own, not an inline script, so the page's policy can be `script-src 'self'`.
// The document's URL is relative to the page, so it is found behind a path prefix too.
"use strict";

window.ui = SwaggerUIBundle({
  url: new URL("../openapi.json", document.baseURI).href,
  dom_id: "#swagger-ui",
  deepLinking: true,
  // The badge would load an image from validator.swagger.io; the page reaches only this server.
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
