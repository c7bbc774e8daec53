"""SLSA v1 provenance of an image: an in-toto Statement v1 in a DSSE envelope (securesystemslib).

The subject is the image's OCI manifest digest. The resolved dependencies are every upstream source
(by its SHA-256), every package output the image holds or was built with (toolchain included) and
the build environment; the byproducts name the SBOM by digest, so the signature covers it too.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any
from urllib.parse import quote

from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import Key, Signer

from hadron import __version__
from hadron.errors import HadronError
from hadron.trust.sbom import SPDX_MEDIA, Component

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
DSSE_MEDIA = "application/vnd.dsse.envelope.v1+json"
BUILD_TYPE = "https://github.com/hadron-linux/hadron/image-build/v1"
BUILDER_ID = "https://github.com/hadron-linux/hadron/builder"
SBOM_NAME = "sbom.spdx.json"


def _time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _output_uri(c: Component) -> str:
    return f"hadron:output/{c.name}@{c.version}"


def statement(*, image: str, version: str, manifest_digest: str, external: dict[str, Any],
              internal: dict[str, Any], components: list[Component], build_inputs: list[Component],
              build_env: str | None, invocation: str, started: float, finished: float,
              sbom: bytes) -> dict[str, Any]:
    deps: list[dict[str, Any]] = []
    seen: set[str] = set()
    for c in [*components, *build_inputs]:
        if c.name in seen:
            continue
        seen.add(c.name)
        deps.append({"name": f"output:{c.name}", "uri": _output_uri(c), "digest": {"sha256": c.output}})
        deps += [{"name": f"source:{c.name}:{s.url.rsplit('/', 1)[-1]}", "uri": s.url, "digest": {"sha256": s.sha256}}
                 for s in c.sources]
    if build_env and build_env.startswith("buildenv:sha256:"):  # the locked build environment, by digest
        deps.append({"name": "build-environment", "uri": f"hadron:{build_env}",
                     "digest": {"sha256": build_env.removeprefix("buildenv:sha256:")}})
    elif build_env:  # the host's own /usr: named, it has no digest
        deps.append({"name": "build-environment", "uri": f"hadron:build-environment/{quote(build_env)}",
                     "annotations": {"identity": build_env}})
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f"hadron/{image}:{version}",
                     "digest": {"sha256": manifest_digest.removeprefix("sha256:")}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {"buildType": BUILD_TYPE, "externalParameters": external,
                                "internalParameters": internal, "resolvedDependencies": deps},
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"hadron": __version__}},
                "metadata": {"invocationId": invocation, "startedOn": _time(started), "finishedOn": _time(finished)},
                "byproducts": [{"name": SBOM_NAME, "mediaType": SPDX_MEDIA,
                                "digest": {"sha256": hashlib.sha256(sbom).hexdigest()}}],
            },
        },
    }


def sign(stmt: dict[str, Any], signer: Signer) -> bytes:
    """``stmt`` in a DSSE envelope signed by ``signer``, as JSON bytes."""
    env = Envelope(payload=json.dumps(stmt, sort_keys=True).encode(), payload_type=PAYLOAD_TYPE, signatures={})
    env.sign(signer)
    return json.dumps(env.to_dict(), sort_keys=True).encode()


def unsigned(stmt: dict[str, Any]) -> bytes:
    """``stmt`` in a DSSE envelope with no signature (an image built without a provenance key)."""
    env = Envelope(payload=json.dumps(stmt, sort_keys=True).encode(), payload_type=PAYLOAD_TYPE, signatures={})
    return json.dumps(env.to_dict(), sort_keys=True).encode()


def open_envelope(data: bytes, where: str, key: Key | None) -> tuple[dict[str, Any], bool]:
    """The Statement in the DSSE envelope ``data`` and whether ``key`` signed it. Without a key the
    payload is read and reported unverified; with one a bad or missing signature is an error."""
    try:
        env = Envelope.from_dict(json.loads(data))
    except (ValueError, KeyError, TypeError) as e:
        raise HadronError(f"{where}: not a DSSE envelope ({e})") from None
    if env.payload_type != PAYLOAD_TYPE:
        raise HadronError(f"{where}: payload type {env.payload_type!r}, expected {PAYLOAD_TYPE}")
    verified = False
    if key is not None:
        if not env.signatures:
            raise HadronError(f"{where}: the provenance is not signed",
                              hint="the image was built without a provenance key; make one with "
                                   "`hadron keys image-signing` and build again")
        try:
            env.verify([key], 1)
        except VerificationError as e:
            raise HadronError(f"{where}: the provenance signature does not verify with key {key.keyid[:16]} ({e})",
                              hint="the image or its provenance was altered, or it was signed by another key: "
                                   "pass the provenance.pub of the builder that made it") from None
        verified = True
    try:
        stmt: dict[str, Any] = json.loads(env.payload)
    except ValueError as e:
        raise HadronError(f"{where}: the payload is not JSON ({e})") from None
    if stmt.get("_type") != STATEMENT_TYPE or stmt.get("predicateType") != PREDICATE_TYPE:
        raise HadronError(f"{where}: not an in-toto Statement with SLSA v1 provenance "
                          f"({stmt.get('_type')!r}, {stmt.get('predicateType')!r})")
    return stmt, verified
