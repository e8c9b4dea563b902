#!/usr/bin/env python3
"""Checks Isthmus' SVIDs and SPIFFE bundle with an implementation that is not ours:
py-spiffe (PyPI `spiffe`) for the SPIFFE objects, `cryptography` for X.509 path
validation, Python's `ssl` (OpenSSL) for the bundle endpoint's https_spiffe profile.

    spiffe_check.py --bundle-url https://127.0.0.1:PORT/ --bootstrap ROOT.pem \
        --trust-domain TD --endpoint-id SPIFFE_ID --svid NAME=CHAIN.pem,KEY.pem ...

Prints one JSON document: what the bundle holds and, per SVID, whether it verified (and
at which stage it failed). Exit status: 0 when everything could be checked (a refused
SVID is a result, not an error), 1 on a usage or fetch error, 3 when a module is missing.
Used by federation-controller/tests/spiffe_interop.rs; scripts/test.sh installs the
pinned modules.
"""

import argparse
import base64
import datetime
import http.client
import json
import ssl
import sys
import urllib.parse

try:
    import cryptography
    import jwt  # PyJWT, a dependency of py-spiffe: an independent JWK → key decoder
    import spiffe
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
    from spiffe import SpiffeId, TrustDomain, X509Bundle, X509BundleSet, X509Svid
except ImportError as e:  # the test must fail loudly, never skip
    print(f"spiffe_check.py: missing Python module: {e} "
          "(scripts/test.sh installs them: pip install spiffe cryptography)", file=sys.stderr)
    sys.exit(3)


def fail(message):
    print(f"spiffe_check.py: {message}", file=sys.stderr)
    sys.exit(1)


def spki(public_key):
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def fetch_bundle(url, bootstrap_pem, endpoint_id):
    """GET the bundle document with the https_spiffe profile (SPIFFE Trust Domain and
    Bundle §5.2.2): the server's chain must verify against the bundle we already hold, and
    its SVID must be the endpoint SPIFFE ID we were told; DNS names play no part."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https":
        fail(f"{url}: a bundle endpoint is https")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bootstrap_pem.decode())
    conn = http.client.HTTPSConnection(u.hostname, u.port or 443, context=ctx, timeout=10)
    conn.request("GET", u.path or "/")
    peer = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True))
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        fail(f"{url}: HTTP {response.status}: {body[:200]!r}")
    uris = peer.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [endpoint_id]:
        fail(f"{url}: the endpoint proved {uris}, expected [{endpoint_id}]")
    return body, uris[0]


def parse_bundle(trust_domain, document):
    """The SPIFFE bundle format is a JWK Set; py-spiffe 0.3.2 reads X.509 bundles only as
    PEM/DER (`X509Bundle.parse`/`parse_raw`) and JWKS only for JWT authorities
    (`JwtBundle.parse`), so the `x509-svid` keys are read here: each must carry exactly
    one certificate in x5c whose public key equals the JWK's own key members (decoded by
    PyJWT, not by us). The certificates then go into a py-spiffe X509Bundle."""
    doc = json.loads(document)
    roots = []
    for i, key in enumerate(doc.get("keys", [])):
        if key.get("use") != "x509-svid":
            continue  # jwt-svid keys are not X.509 authorities
        x5c = key.get("x5c", [])
        if len(x5c) != 1:
            fail(f"bundle key {i}: x5c must hold exactly one certificate, has {len(x5c)}")
        cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0]))
        members = {k: v for k, v in key.items() if k not in ("x5c", "use")}
        from_jwk = jwt.PyJWK.from_dict(members, algorithm={"EC": "ES256", "RSA": "RS256"}.get(key.get("kty")))
        if spki(from_jwk.key) != spki(cert.public_key()):
            fail(f"bundle key {i}: the JWK's key does not match its certificate's")
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            fail(f"bundle key {i}: an X.509 authority must be a CA certificate")
        roots.append(cert)
    if not roots:
        fail("the bundle holds no x509-svid key")
    bundle = X509Bundle(TrustDomain(trust_domain), set(roots))
    meta = {
        "trust_domain": str(bundle.trust_domain),
        "sequence": doc.get("spiffe_sequence"),
        "refresh_hint": doc.get("spiffe_refresh_hint"),
        "roots_der_base64": sorted(base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                                   for c in bundle.x509_authorities),
    }
    return bundle, meta


def check_svid(bundles, chain_pem, key_pem):
    """One SVID: parsed by py-spiffe (SVID rules: one SPIFFE URI SAN, not a CA, key usage,
    key matches), then its chain validated by cryptography against the bundle of the SVID's
    own trust domain, as a TLS client certificate at the current time."""
    try:
        svid = X509Svid.parse(chain_pem, key_pem)
    except Exception as e:
        return {"ok": False, "stage": "parse", "error": f"{type(e).__name__}: {e}"}
    if spki(svid.private_key.public_key()) != spki(svid.leaf.public_key()):
        return {"ok": False, "stage": "parse", "error": "the private key does not fit the leaf"}
    sid = svid.spiffe_id
    td = sid.trust_domain
    bundle = bundles.get_bundle_for_trust_domain(td)
    if bundle is None:
        return {"ok": False, "stage": "trust_domain", "spiffe_id": str(sid),
                "error": f"no bundle for trust domain {td}"}
    # Roots the peer sends along are not trusted for being sent: only the bundle's are.
    authorities = bundle.x509_authorities
    intermediates = [c for c in svid.cert_chain[1:] if c not in authorities]
    verifier = (PolicyBuilder()
                .store(Store(list(authorities)))
                .time(datetime.datetime.now(datetime.timezone.utc))
                .build_client_verifier())
    try:
        verified = verifier.verify(svid.leaf, intermediates)
    except VerificationError as e:
        return {"ok": False, "stage": "verify", "spiffe_id": str(sid), "error": str(e)}
    uris = [n.value for n in verified.subjects if isinstance(n, x509.UniformResourceIdentifier)]
    if uris != [str(sid)]:
        return {"ok": False, "stage": "verify", "spiffe_id": str(sid),
                "error": f"verified subjects {uris} are not the SVID's ID"}
    return {
        "ok": True,
        "spiffe_id": str(sid),
        "trust_domain": str(td),
        "path": sid.path,
        "chain_len": len(verified.chain),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle-url", required=True)
    p.add_argument("--bootstrap", required=True, help="PEM roots that authenticate the endpoint")
    p.add_argument("--trust-domain", required=True)
    p.add_argument("--endpoint-id", required=True, help="the SPIFFE ID the endpoint must prove")
    p.add_argument("--svid", action="append", default=[], metavar="NAME=CHAIN,KEY")
    a = p.parse_args()

    try:
        document, endpoint = fetch_bundle(a.bundle_url, open(a.bootstrap, "rb").read(), a.endpoint_id)
    except (OSError, ssl.SSLError) as e:
        fail(f"{a.bundle_url}: {e}")
    bundle, meta = parse_bundle(a.trust_domain, document)
    meta["endpoint_id"] = endpoint
    bundles = X509BundleSet.of([bundle])
    out = {
        "versions": {"spiffe": _version("spiffe"), "cryptography": cryptography.__version__},
        "bundle": meta,
        "svids": {},
    }
    for spec in a.svid:
        name, _, files = spec.partition("=")
        chain, _, key = files.partition(",")
        out["svids"][name] = check_svid(bundles, open(chain, "rb").read(), open(key, "rb").read())
    print(json.dumps(out, indent=2))


def _version(dist):
    from importlib.metadata import version
    return version(dist)


if __name__ == "__main__":
    main()
