// Entry point: hash routes (#/runs, #/runs/{id}, #/compare?runs=a,b, #/datasets[/{id}], #/evals[/{id}])
// and sign-in state.

import { clearKey, getKey } from "./api.js";
import { notify } from "./dom.js";
import { renderCompare } from "./views/compare.js";
import { renderDataset, renderDatasets } from "./views/datasets.js";
import { renderEval, renderEvals } from "./views/evals.js";
import { renderLogin } from "./views/login.js";
import { renderRun } from "./views/run.js";
import { renderRuns } from "./views/runs.js";

const view = document.getElementById("view");
const nav = document.getElementById("main-nav");
const signOut = document.getElementById("sign-out");
let dispose = null;

const ROUTES = [
  [/^runs\/([\w-]+)$/, (m) => renderRun(view, m[1]), "runs"],
  [/^runs$/, (m, params) => renderRuns(view, params), "runs"],
  [/^compare$/, (m, params) => renderCompare(view, params), "runs"],
  [/^datasets\/([\w-]+)$/, (m) => renderDataset(view, m[1]), "datasets"],
  [/^datasets$/, () => renderDatasets(view), "datasets"],
  [/^evals\/([\w-]+)$/, (m) => renderEval(view, m[1]), "evals"],
  [/^evals$/, () => renderEvals(view), "evals"],
];

function route() {
  dispose?.();
  dispose = null;
  const signedIn = Boolean(getKey());
  nav.hidden = !signedIn;
  signOut.hidden = !signedIn;
  if (!signedIn) {
    document.title = "Sign in · Tuneyard";
    renderLogin(view, { onSignedIn: route });
    return;
  }
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  const params = new URLSearchParams(query ?? "");
  for (const [pattern, render, section] of ROUTES) {
    const match = path.match(pattern);
    if (!match) continue;
    for (const link of nav.querySelectorAll("a")) {
      if (link.dataset.nav === section) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    document.title = `${match[1] ?? section[0].toUpperCase() + section.slice(1)} · Tuneyard`;
    dispose = render(match, params);
    return;
  }
  location.replace("#/runs");
}

signOut.addEventListener("click", () => {
  clearKey();
  location.hash = "#/runs";
  route();
});

window.addEventListener("tuneyard:unauthorized", () => {
  if (!getKey()) return;
  clearKey();
  notify("The API key was rejected; sign in again.", "error");
  route();
});

window.addEventListener("hashchange", route);
route();
