"""The trusted path's unseal matrix, without a VM: the probe scripts parse, the console protocol is
read back (verdicts, the sealed credential, a wrong secret, a silent probe), and the other-key UKI
gets a new PCR key but keeps the Secure Boot keys."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from pathlib import Path

import pytest

from hadron.boot import measure, qemu, secureboot, unseal
from hadron.errors import HadronError


def console(*lines: str) -> qemu.BootResult:
    text = "\n".join(f"[   30.{i:06d}] HADRON-PROBE {ln}" for i, ln in enumerate(lines))
    return qemu.BootResult(state="running", console="[   29.0] HADRON-CHECK state=running\n" + text + "\n")


@pytest.mark.parametrize("script", [unseal.seal_probe(), unseal.unseal_probe("renewed-uki")])
def test_probe_scripts_are_valid_shell(script: str) -> None:
    assert script.startswith("#!/bin/sh\n")
    res = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "/etc/hadron-probe/secret.cred" in script and "--name=hadron-probe" in script


def test_seal_probe_binds_to_the_signed_policy_only() -> None:
    script = unseal.seal_probe()
    assert "--with-key=tpm2-with-public-key" in script
    assert "--tpm2-public-key=/run/systemd/tpm2-pcr-public-key.pem" in script
    assert "--tpm2-public-key-pcrs=11" in script and "--tpm2-pcrs" not in script
    # the order of the first boot's cases: unseal, extend PCR 11, unseal again
    assert script.index("unseal signed-boot") < script.index("systemd-pcrextend") < script.index(
        "unseal after-pcrextend")


def test_verdicts_are_read_from_the_console() -> None:
    secret = unseal.new_secret()
    good = hashlib.sha256(secret.encode()).hexdigest()
    res = console(f"unseal signed-boot unsealed {good}",
                  "unseal after-pcrextend refused Failed to unseal secret using TPM2: State not recoverable",
                  f"unseal renewed-uki unsealed {'0' * 64}")
    ok = unseal.parse_case(res, "signed-boot", secret)
    assert (ok.result, ok.ok) == ("unsealed", True)
    refused = unseal.parse_case(res, "after-pcrextend", secret)
    assert refused.ok and "State not recoverable" in refused.detail
    # unsealing something else than the secret is not a success
    wrong = unseal.parse_case(res, "renewed-uki", secret)
    assert (wrong.result, wrong.ok) == ("mismatch", False)
    # a case the probe never reported is "missing", and wrong either way
    missing = unseal.parse_case(res, "no-tpm", secret)
    assert (missing.result, missing.ok) == ("missing", False)
    assert missing.to_json()["expected"] == "refused"


def test_an_unexpected_unseal_is_not_ok() -> None:
    secret = "s"
    res = console(f"unseal other-pcr-key unsealed {hashlib.sha256(b's').hexdigest()}")
    case = unseal.parse_case(res, "other-pcr-key", secret)
    assert case.result == "unsealed" and not case.ok


def test_sealed_credential_round_trips_through_the_console() -> None:
    blob = base64.b64encode(bytes(range(200))).decode()
    lines = [blob[i:i + 79] for i in range(0, len(blob), 79)]
    res = console("seal ok", *(f"cred {ln}" for ln in lines))
    assert base64.b64decode(unseal.sealed_credential(res)) == bytes(range(200))


@pytest.mark.parametrize(("lines", "message"), [
    (("seal failed Failed to find TPM2 device",), "could not seal.*Failed to find TPM2 device"),
    ((), "the probe reported nothing"),
    (("seal ok", "cred %%%notbase64"), "not base64"),
])
def test_sealing_failures_are_explained(lines: tuple[str, ...], message: str) -> None:
    with pytest.raises(HadronError, match=message):
        unseal.sealed_credential(console(*lines))


def test_matrix_is_ok_only_with_every_case_as_expected() -> None:
    cases = [unseal.Case(n, x, x, "") for n, x in unseal.EXPECTED.items()]
    assert unseal.Matrix(cases, {}).ok
    assert not unseal.Matrix(cases[:-1], {}).ok
    flipped = [*cases[:-1], unseal.Case("no-tpm", "refused", "unsealed", "")]
    assert not unseal.Matrix(flipped, {}).ok


def test_other_pcr_keys_replace_only_the_policy_pair(tmp_path: Path) -> None:
    keys = secureboot.generate_keys(tmp_path / "keys")
    other = unseal.other_pcr_keys(keys, tmp_path / "other")
    assert other.db == keys.db and other.pk == keys.pk
    assert other.pcr_public_key.parent == tmp_path / "other"
    mine = measure.public_key_fingerprint(measure.load_pcr_public_key(keys.pcr_public_key))
    theirs = measure.public_key_fingerprint(measure.load_pcr_public_key(other.pcr_public_key))
    assert mine != theirs
    measure.load_pcr_keypair(other.pcr_private_key, other.pcr_public_key)  # a matching pair


def test_later_boots_run_three_boots_with_the_credential(tmp_path: Path) -> None:
    keys = secureboot.generate_keys(tmp_path / "keys")
    secret = unseal.new_secret()
    good = hashlib.sha256(secret.encode()).hexdigest()
    first = console(f"unseal signed-boot unsealed {good}", "unseal after-pcrextend refused denied")
    calls: list[tuple[str, bool, Path]] = []

    def boot(probe: str, files: dict[str, bytes], ks: secureboot.KeySet, extra: str, tpm: bool) -> qemu.BootResult:
        case = probe.strip().rsplit("\n", 1)[-1].split()[1]
        assert files == {unseal.CREDENTIAL: b"CRED\n"}
        calls.append((case, tpm, ks.pcr_public_key))
        verdict = {"renewed-uki": f"unsealed {good}", "other-pcr-key": "refused policy signature mismatch",
                   "no-tpm": "refused No TPM2 device"}[case]
        return console(f"unseal {case} {verdict}")

    m = unseal.later_boots(boot, keys, tmp_path, secret, b"CRED\n", first)
    assert [c.name for c in m.cases] == list(unseal.EXPECTED) and m.ok
    assert [(c, t) for c, t, _ in calls] == [("renewed-uki", True), ("other-pcr-key", True), ("no-tpm", False)]
    assert calls[0][2] == keys.pcr_public_key and calls[1][2] != keys.pcr_public_key


@pytest.mark.parametrize(("detail", "says"), [
    ("Failed to unseal secret using TPM2: Device not a stream", "no signature in the booted UKI's .pcrsig"),
    ("ERROR:tcti:tcti-device.c:455 Failed to open specified TCTI device file /dev/tpmrm0: No such file or "
     "directory", "the machine has no TPM 2.0 device"),
    ("something new", ""),
])
def test_refusals_are_explained(detail: str, says: str) -> None:
    assert unseal.explain(detail).startswith(says)
    case = unseal.Case("other-pcr-key", "refused", "refused", detail)
    assert case.to_json()["meaning"] == unseal.explain(detail)
