// The HTTP API client: every request carries the key from session storage as a Bearer token.

const KEY_STORAGE = "tuneyard.apiKey";

export const getKey = () => sessionStorage.getItem(KEY_STORAGE);
export const setKey = (key) => sessionStorage.setItem(KEY_STORAGE, key);
export const clearKey = () => sessionStorage.removeItem(KEY_STORAGE);

export function authHeaders(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

/** An error answer of the API: `{"error": {type, code, message, param}}` with its HTTP status. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code;
    this.type = error?.type;
    this.param = error?.param;
  }
}

function withQuery(path, query) {
  if (!query) return path;
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    if (value === undefined || value === null || value === "") continue;
    params.set(name, Array.isArray(value) ? value.join(",") : String(value));
  }
  const text = params.toString();
  return text ? `${path}?${text}` : path;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return new ApiError(response.status, body?.error ?? { message: body?.detail });
  } catch {
    return new ApiError(response.status, { message: `${response.status} ${response.statusText}` });
  }
}

/** Sends one request and returns the parsed JSON body; throws ApiError on any non-2xx answer. */
export async function api(path, { method = "GET", query, body, signal, signOutOn401 = true } = {}) {
  const headers = authHeaders({ Accept: "application/json" });
  const init = { method, headers, signal };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(withQuery(path, query), init);
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401 && signOutOn401) window.dispatchEvent(new CustomEvent("tuneyard:unauthorized"));
    throw error;
  }
  return response.status === 204 ? null : response.json();
}

/** Uploads a file as multipart form data (the browser streams it) and returns the parsed answer. */
export async function uploadForm(path, form) {
  const response = await fetch(path, { method: "POST", headers: authHeaders({ Accept: "application/json" }), body: form });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/**
 * Downloads an authenticated file: fetches it with the key, then saves it through a blob URL.
 * A plain link cannot carry the Authorization header, so the bytes pass through memory; for
 * very large checkpoints use the API directly (curl -H "Authorization: Bearer …" -C -).
 */
export async function downloadWithKey(path, filename) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw await errorOf(response);
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
