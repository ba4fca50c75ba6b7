// A real OpenID provider for Stockade's single sign-on tests: the npm package
// oidc-provider (OpenID-certified), with its built-in login and consent pages
// (devInteractions: any password; the login is the account id, which is the
// subject), on 127.0.0.1.
//
//   node provider.mjs CONFIG.json
//
// CONFIG: {"port", "issuer", "state_dir", "clients": [{client_id,
// client_secret, redirect_uris}]}. The tests steer it through two files in
// state_dir that it reads at every request, so a test changes them between
// logins without a restart:
//   accounts.json   {"ACCOUNT_ID": {claims: email, email_verified,
//                    preferred_username, name, groups, roles...}}; an account
//                    missing there signs in with a subject and nothing else
//   behaviour.json  {"jwks_down": true} the key endpoint answers 503;
//                   {"access_token_ttl": 20} short-lived access tokens;
//                   {"tamper": {...}} the token endpoint's ID token is
//                   re-signed with changes: "claims" (merged, e.g. {"aud":
//                   "other"}), "expired" (exp in the past), "foreign_key"
//                   (signed by a key it does not publish)
// The signing key is kept in state_dir/signing-key.json, so a restart keeps
// it (delete the file to rotate it). "ready PORT" on stdout once listening.
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';

import Provider from 'oidc-provider';
import * as jose from 'jose';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const dir = config.state_dir;

function readJson(name, fallback) {
  try {
    return JSON.parse(readFileSync(join(dir, name), 'utf8'));
  } catch {
    return fallback;
  }
}

async function newKey(prefix) {
  const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
  const jwk = await jose.exportJWK(privateKey);
  return { ...jwk, kid: `${prefix}-${Date.now().toString(36)}`, alg: 'RS256', use: 'sig' };
}

const keyFile = join(dir, 'signing-key.json');
if (!existsSync(keyFile)) writeFileSync(keyFile, JSON.stringify(await newKey('idp')));
const signingJwk = JSON.parse(readFileSync(keyFile, 'utf8'));
const foreignJwk = await newKey('foreign');

const provider = new Provider(config.issuer, {
  clients: config.clients.map((client) => ({
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...client,
  })),
  jwks: { keys: [signingJwk] },
  cookies: { keys: ['stockade-test-idp-cookies'] },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
    roles: ['roles'],
  },
  pkce: { required: () => true },
  ttl: {
    // Some providers hand out access tokens that live for seconds.
    AccessToken: () => readJson('behaviour.json', {}).access_token_ttl || 3600,
  },
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        const { sub: _ignored, ...claims } = readJson('accounts.json', {})[id] || {};
        return { sub: id, ...claims };
      },
    };
  },
});

async function retamper(idToken, tamper) {
  const payload = jose.decodeJwt(idToken);
  const now = Math.floor(Date.now() / 1000);
  Object.assign(payload, tamper.claims || {});
  if (tamper.expired) {
    payload.iat = now - 3600;
    payload.exp = now - 1800;
  }
  const jwk = tamper.foreign_key ? foreignJwk : signingJwk;
  const key = await jose.importJWK(jwk, 'RS256');
  return new jose.SignJWT(payload).setProtectedHeader({ alg: 'RS256', kid: jwk.kid }).sign(key);
}

provider.use(async (ctx, next) => {
  const behaviour = readJson('behaviour.json', {});
  if (ctx.path === '/jwks' && behaviour.jwks_down) {
    ctx.status = 503;
    ctx.body = 'the key endpoint is down (test)';
    return;
  }
  await next();
  if (ctx.type === 'text/html' && typeof ctx.body === 'string') {
    // The built-in pages load a web font from the internet: not in these tests.
    ctx.body = ctx.body.replace(/@import url\(https:\/\/fonts\.googleapis\.com[^)]*\);/g, '');
  }
  if (
    ctx.path === '/token' && ctx.method === 'POST' && ctx.status === 200
    && behaviour.tamper && ctx.body && ctx.body.id_token
  ) {
    ctx.body = { ...ctx.body, id_token: await retamper(ctx.body.id_token, behaviour.tamper) };
  }
});

provider.listen(config.port, '127.0.0.1', () => {
  process.stdout.write(`ready ${config.port}\n`);
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
