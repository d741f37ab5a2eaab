// An OpenID Connect provider for the test suite: client-credentials grant,
// resource indicators, JWT access tokens signed RS256 or ES256.
//
//   node server.js [PORT]          (or PORT in the environment; 0 picks one)
//
// It prints one line `listening <port>` once it serves. POST /admin/rotate
// replaces the signing keys while running; the old keys stop being published.

import crypto from 'node:crypto';
import http from 'node:http';

import Provider, { errors } from 'oidc-provider';

const CLIENTS = [
  { client_id: 'agents-client', client_secret: 'agents-secret' },
];

// Resource indicator -> signing algorithm of its access tokens.
const RESOURCES = {
  'urn:agents:rs256': 'RS256',
  'urn:agents:es256': 'ES256',
};

let generation = 0;

function newKeys() {
  generation += 1;
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return [
    { ...rsa.privateKey.export({ format: 'jwk' }), kid: `rsa-${generation}`, use: 'sig', alg: 'RS256' },
    { ...ec.privateKey.export({ format: 'jwk' }), kid: `ec-${generation}`, use: 'sig', alg: 'ES256' },
  ];
}

function buildProvider(issuer) {
  const provider = new Provider(issuer, {
    clients: CLIENTS.map((c) => ({
      ...c,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_post',
    })),
    jwks: { keys: newKeys() },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => 'urn:agents:rs256',
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource) => {
          const alg = RESOURCES[resource];
          if (!alg) throw new errors.InvalidTarget();
          return {
            scope: 'agents',
            audience: resource,
            accessTokenTTL: 600,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg } },
          };
        },
      },
    },
    scopes: ['agents'],
  });
  provider.proxy = false;
  return provider;
}

function main() {
  const port = Number(process.argv[2] || process.env.PORT || 0);
  let handler = null;
  const server = http.createServer((req, res) => {
    if (req.method === 'POST' && req.url === '/admin/rotate') {
      handler = buildProvider(server.issuer).callback();
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ generation }));
      return;
    }
    handler(req, res);
  });
  server.listen(port, '127.0.0.1', () => {
    const actual = server.address().port;
    server.issuer = `http://127.0.0.1:${actual}`;
    handler = buildProvider(server.issuer).callback();
    process.stdout.write(`listening ${actual}\n`);
  });
  process.on('SIGTERM', () => server.close(() => process.exit(0)));
}

main();
