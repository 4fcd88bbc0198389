// A real authorization server for the interop tests: panva's oidc-provider,
// configured with the clients the tests use, on 127.0.0.1.
//
//   node tests/oidc/server.mjs [port]     (port 0 or none: a free port)
//
// Prints `READY <port>` on stdout once it listens, and exits when its stdin
// closes (the test harness holds the other end).
//
// Besides the provider's own endpoints it serves two routes of its own:
//   /interaction/<uid>  completes login (fixed account "alice") and consent
//                       without a browser;
//   /dev/code?client_id=..&redirect_uri=..&scope=..[&code_challenge=..&code_challenge_method=..&dpop_jkt=..]
//                       drives the provider's authorization endpoint with a
//                       cookie jar, as a browser would, and answers
//                       {"code": "..."} — an authorization code for the test
//                       to exchange at the token endpoint.
//   /dev/clock?seconds=N
//                       moves the server's clock N seconds ahead (DPoP nonces
//                       rotate every 60 s); answers {"offset_seconds": total}.
//   /dev/drop-access-token?token=..
//                       forgets one access token (as if it had expired), not
//                       its grant; answers {"dropped": bool}.
//   /dev/dpop-stats     {"proofs": n, "jtis": n, "rejected": n}: the DPoP proofs
//                       received at the token endpoint, their distinct jti
//                       values, and the proofs answered with an error other
//                       than use_dpop_nonce.
//
// The clients that sign (private_key_jwt) are registered with the public
// halves of the test-only keys in tests/keys.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import Provider from 'oidc-provider';

// The server's clock, movable by /dev/clock. Everything in the provider
// reads Date.now().
const realNow = Date.now;
let clockOffsetMs = 0;
Date.now = () => realNow() + clockOffsetMs;

const KEYS_DIR = new URL('../keys/', import.meta.url);
const publicJwk = (file, kid) => {
  const pub = crypto
    .createPublicKey(crypto.createPrivateKey(fs.readFileSync(new URL(file, KEYS_DIR))))
    .export({ format: 'jwk' });
  return { ...pub, kid };
};
const CLIENT_JWKS = {
  keys: [
    publicJwk('es256-test-only.pem', 'es256'),
    publicJwk('rsa-2048-test-only.pem', 'rs256'),
    publicJwk('ed25519-test-only.pem', 'eddsa'),
  ],
};

const dpopStats = { proofs: 0, jtis: new Set(), rejected: 0 };

const ACCOUNT = 'alice';
const SHORT_TTL_SECONDS = 2;

const requestedPort = Number(process.argv[2] ?? process.env.OIDC_PORT ?? 0);

let handleProvider = null;
const server = http.createServer((req, res) => {
  route(req, res).catch((err) => {
    process.stderr.write(`server.mjs: ${err?.stack ?? err}\n`);
    if (!res.headersSent) {
      res.statusCode = 500;
      res.end('internal error');
    }
  });
});

server.listen(requestedPort, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, configuration());
  provider.on('server_error', (_ctx, err) => process.stderr.write(`provider: ${err?.stack ?? err}\n`));
  handleProvider = provider.callback();
  server.provider = provider;
  process.stdout.write(`READY ${port}\n`);
});

process.stdin.on('end', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
process.stdin.resume();

function shortLived(client) {
  return client?.clientId?.startsWith('short') ?? false;
}

function configuration() {
  return {
    clients: [
      {
        // Characters that must be form-urlencoded in client_secret_basic (RFC 6749 §2.3.1).
        client_id: 'reports:svc',
        client_secret: 's3cr3t +/=:%&?~',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
        scope: 'api:read',
      },
      {
        client_id: 'post-svc',
        client_secret: 'post-secret',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_post',
        scope: 'api:read',
      },
      {
        client_id: 'app',
        client_secret: 'app-secret',
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        redirect_uris: ['http://127.0.0.1/callback'],
        token_endpoint_auth_method: 'client_secret_basic',
      },
      {
        // Access tokens of this client live SHORT_TTL_SECONDS.
        client_id: 'short-app',
        client_secret: 'short-app-secret',
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        redirect_uris: ['http://127.0.0.1/callback'],
        token_endpoint_auth_method: 'client_secret_basic',
      },
      {
        // private_key_jwt (ES256, RS256 or EdDSA) and DPoP-bound tokens.
        client_id: 'jwt-svc',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'private_key_jwt',
        jwks: CLIENT_JWKS,
        dpop_bound_access_tokens: true,
        scope: 'api:read',
      },
      {
        // Authorization code with PKCE (required), private_key_jwt, DPoP.
        client_id: 'jwt-app',
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        redirect_uris: ['http://127.0.0.1/callback'],
        token_endpoint_auth_method: 'private_key_jwt',
        jwks: CLIENT_JWKS,
        dpop_bound_access_tokens: true,
      },
      {
        client_id: 'secret-jwt-svc',
        client_secret: 'secret-jwt-svc-secret-of-at-least-32-bytes',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_jwt',
        scope: 'api:read',
      },
      {
        // DPoP-bound tokens with a plain secret.
        client_id: 'dpop-svc',
        client_secret: 'dpop-svc-secret',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
        dpop_bound_access_tokens: true,
        scope: 'api:read',
      },
      {
        // The upstream API: validates access tokens by introspection.
        client_id: 'resource-server',
        client_secret: 'resource-server-secret',
        grant_types: [],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
      },
    ],
    scopes: ['openid', 'offline_access', 'api:read'],
    findAccount: async (_ctx, id) => ({ accountId: id, claims: async () => ({ sub: id }) }),
    cookies: { keys: ['interop-tests-only'] },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      dPoP: { enabled: true, nonceSecret: crypto.randomBytes(32), requireNonce: () => true },
    },
    pkce: {
      required: (_ctx, client) => client.clientId.startsWith('jwt-'),
    },
    rotateRefreshToken: true,
    // /dev/clock moves the server up to ten minutes ahead of the clients,
    // which sign their assertions with the real clock.
    clockTolerance: 900,
    ttl: {
      AccessToken: (_ctx, _token, client) => (shortLived(client) ? SHORT_TTL_SECONDS : 300),
      ClientCredentials: (_ctx, _token, client) => (shortLived(client) ? SHORT_TTL_SECONDS : 300),
      AuthorizationCode: 60,
      RefreshToken: 3600,
      Grant: 3600,
      Interaction: 600,
      Session: 3600,
      IdToken: 300,
    },
  };
}

async function route(req, res) {
  const provider = server.provider;
  if (!provider) {
    res.statusCode = 503;
    res.end('starting');
    return;
  }
  const url = new URL(req.url, provider.issuer);
  if (url.pathname.startsWith('/interaction/')) {
    await interaction(provider, req, res);
  } else if (url.pathname === '/dev/code') {
    await devCode(provider, url, res);
  } else if (url.pathname === '/dev/clock') {
    clockOffsetMs += Number(url.searchParams.get('seconds') ?? 0) * 1000;
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ offset_seconds: clockOffsetMs / 1000 }));
  } else if (url.pathname === '/dev/drop-access-token') {
    // Forgets one access token, as if it had expired; its grant and refresh
    // token live on.
    const token = await provider.AccessToken.find(url.searchParams.get('token') ?? '');
    if (token) await token.destroy();
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ dropped: Boolean(token) }));
  } else if (url.pathname === '/dev/dpop-stats') {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ proofs: dpopStats.proofs, jtis: dpopStats.jtis.size, rejected: dpopStats.rejected }));
  } else {
    if (url.pathname === '/token' && req.headers.dpop) {
      countProof(req, res);
    }
    handleProvider(req, res);
  }
}

// Counts a DPoP proof sent to the token endpoint, its jti, and whether the
// answer was an error other than a nonce challenge.
function countProof(req, res) {
  dpopStats.proofs += 1;
  try {
    const claims = JSON.parse(Buffer.from(req.headers.dpop.split('.')[1], 'base64url'));
    dpopStats.jtis.add(claims.jti);
  } catch {
    // Counted as a proof; the provider rejects it.
  }
  const chunks = [];
  const write = res.write.bind(res);
  const end = res.end.bind(res);
  res.write = (chunk, ...rest) => {
    if (chunk) chunks.push(Buffer.from(chunk));
    return write(chunk, ...rest);
  };
  res.end = (chunk, ...rest) => {
    if (chunk && typeof chunk !== 'function') chunks.push(Buffer.from(chunk));
    if (res.statusCode >= 400) {
      const body = Buffer.concat(chunks).toString();
      if (!body.includes('use_dpop_nonce')) dpopStats.rejected += 1;
    }
    return end(chunk, ...rest);
  };
}

// Completes whatever the provider asks (login, then consent) for ACCOUNT.
async function interaction(provider, req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session } = details;
  if (prompt.name === 'login') {
    await provider.interactionFinished(req, res, { login: { accountId: ACCOUNT } }, { mergeWithLastSubmission: false });
    return;
  }
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  const missing = prompt.details ?? {};
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  if (missing.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  }
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
}

// Plays the browser: follows the authorization redirects with a cookie jar
// until the provider redirects to the client's redirect_uri with a code.
async function devCode(provider, url, res) {
  const clientId = url.searchParams.get('client_id') ?? 'app';
  const redirectUri = url.searchParams.get('redirect_uri') ?? 'http://127.0.0.1/callback';
  const scope = url.searchParams.get('scope') ?? 'openid offline_access';
  const authorize = new URL('/auth', provider.issuer);
  const params = new URLSearchParams({
    client_id: clientId,
    redirect_uri: redirectUri,
    response_type: 'code',
    scope,
    prompt: 'consent',
    state: 'interop',
  });
  for (const extra of ['code_challenge', 'code_challenge_method', 'dpop_jkt']) {
    if (url.searchParams.has(extra)) params.set(extra, url.searchParams.get(extra));
  }
  authorize.search = params.toString();

  const jar = new Map();
  let next = authorize.toString();
  for (let hop = 0; hop < 12; hop += 1) {
    if (next.startsWith(redirectUri)) {
      const callback = new URL(next);
      const code = callback.searchParams.get('code');
      res.setHeader('content-type', 'application/json');
      if (!code) {
        res.statusCode = 400;
        res.end(JSON.stringify({ error: callback.searchParams.get('error') ?? 'no code', location: next }));
        return;
      }
      res.end(JSON.stringify({ code }));
      return;
    }
    const cookie = [...jar.entries()].map(([k, v]) => `${k}=${v}`).join('; ');
    const answer = await fetch(next, { redirect: 'manual', headers: cookie ? { cookie } : {} });
    for (const line of answer.headers.getSetCookie()) {
      const [pair] = line.split(';');
      const eq = pair.indexOf('=');
      jar.set(pair.slice(0, eq).trim(), pair.slice(eq + 1).trim());
    }
    const location = answer.headers.get('location');
    if (!location) {
      res.statusCode = 502;
      res.end(`authorization stopped at ${answer.status}: ${await answer.text()}`);
      return;
    }
    next = new URL(location, next).toString();
  }
  res.statusCode = 508;
  res.end('too many redirects');
}
