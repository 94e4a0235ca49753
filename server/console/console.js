// The Weir console: a login page, notebooks and the pipelines page, routed by the URL's hash.
import { notebookList, notebookPage } from './notebook.js';
import { pipelinesPage } from './pipelines.js';

export const session = { current: null };

export class LoginRequired extends Error {}

// A JSON API call; a changing one carries the session's CSRF token.
export async function api(method, path, body, options = {}) {
  const headers = { 'Content-Type': 'application/json' };
  if (method !== 'GET') headers['X-Weir-CSRF'] = session.current?.csrf ?? 'login';
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin',
    signal: options.signal,
  });
  if (response.status === 401) {
    session.current = null;
    location.hash = '#/login';
    throw new LoginRequired('log in first');
  }
  if (options.raw) return response;
  const json = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(json.error ?? `${response.status} ${response.statusText}`);
  return json;
}

// An element: el('div', {class: 'x'}, child, 'text', ...).
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function loginPage(main) {
  const error = el('p', { class: 'error', id: 'login-error' });
  const user = el('input', { name: 'user', id: 'login-user', autocomplete: 'username', required: true });
  const password = el('input', {
    name: 'password', id: 'login-password', type: 'password', autocomplete: 'current-password',
  });
  const form = el('form', { class: 'login', id: 'login' },
    el('h1', {}, 'Log in to Weir'),
    el('label', {}, 'User', user),
    el('label', {}, 'Password', password),
    el('button', { type: 'submit' }, 'Log in'),
    error);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.textContent = '';
    try {
      session.current = await api('POST', '/api/session', { user: user.value, password: password.value });
      showSession();
      location.hash = '#/notebooks';
    } catch (e) {
      error.textContent = e.message;
    }
  });
  main.append(form);
  user.focus();
  return () => {};
}

function showSession() {
  const s = session.current;
  document.getElementById('who').textContent = s
    ? (s.user ? `${s.user}${s.admin ? ' (admin)' : ' (read)'}` : 'trust (admin)')
    : '';
  document.getElementById('logout').hidden = !s || s.auth === 'trust';
}

let leave = () => {};

async function route() {
  leave();
  leave = () => {};
  const main = document.getElementById('main');
  main.replaceChildren();
  const hash = decodeURIComponent(location.hash.slice(1) || '/notebooks');
  for (const link of document.querySelectorAll('[data-nav]')) {
    link.classList.toggle('active', hash.startsWith(`/${link.dataset.nav}`));
  }
  if (hash === '/login') {
    leave = loginPage(main);
    return;
  }
  if (!session.current) {
    try {
      session.current = await api('GET', '/api/session');
    } catch (e) {
      if (!(e instanceof LoginRequired)) main.append(el('p', { class: 'error' }, e.message));
      return;
    }
    showSession();
  }
  try {
    if (hash.startsWith('/notebooks/')) leave = await notebookPage(main, hash.slice('/notebooks/'.length));
    else if (hash.startsWith('/pipelines')) leave = pipelinesPage(main);
    else leave = await notebookList(main);
  } catch (e) {
    if (!(e instanceof LoginRequired)) main.append(el('p', { class: 'error' }, e.message));
  }
}

document.getElementById('logout').addEventListener('click', async () => {
  await api('DELETE', '/api/session').catch(() => {});
  session.current = null;
  showSession();
  location.hash = '#/login';
});
window.addEventListener('hashchange', route);
route();
