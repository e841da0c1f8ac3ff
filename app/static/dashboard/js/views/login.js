// Key entry: the key is checked against the API, then kept in session storage (gone when the tab closes).

import { api, clearKey, setKey } from "../api.js";
import { h } from "../dom.js";

export function renderLogin(view, { onSignedIn }) {
  const input = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    required: true,
    spellcheck: "false",
    "aria-describedby": "api-key-help",
  });
  const error = h("p", { id: "login-error", class: "form-error", role: "alert" });
  const submit = h("button", { type: "submit", class: "button-primary" }, "Sign in");

  const form = h(
    "form",
    { class: "card login", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Sign in to Tuneyard"),
    h("label", { for: "api-key" }, "API key"),
    input,
    h("p", { id: "api-key-help", class: "muted" }, "Kept in this tab's session storage only; sent as a Bearer token."),
    error,
    submit,
  );

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    error.textContent = "";
    submit.disabled = true;
    setKey(input.value.trim());
    try {
      await api("/v1/runs", { query: { limit: 1 }, signOutOn401: false });
      onSignedIn();
    } catch (err) {
      clearKey();
      error.textContent =
        err.status === 401 ? "That key was not accepted. Check it and try again." : `Could not sign in: ${err.message}`;
      submit.disabled = false;
      input.focus();
    }
  });

  view.replaceChildren(form);
  input.focus();
}
