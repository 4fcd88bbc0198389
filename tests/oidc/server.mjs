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
//   /dev/code?client_id=..&redirect_uri=..&scope=..
//                       drives the provider's authorization endpoint with a
//                       cookie jar, as a browser would, and answers
//                       {"code": "..."} — an authorization code for the test
//                       to exchange at the token endpoint.
import http from 'node:http';
import Provider from 'oidc-provider';

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
    },
    rotateRefreshToken: true,
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
  } else {
    handleProvider(req, res);
  }
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
  authorize.search = new URLSearchParams({
    client_id: clientId,
    redirect_uri: redirectUri,
    response_type: 'code',
    scope,
    prompt: 'consent',
    state: 'interop',
  }).toString();

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
