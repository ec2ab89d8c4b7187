"""Nothing read from the bucket is trusted: crafted manifests are refused whole, nothing is
written outside the staging directory, and the rest of the sync goes on."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from serving.sync import sync_once
from storage.models import MANIFEST, ModelStore, UnsafeManifest, local_versions
from tests.conftest import run_mnist

LINEAGE = {"flow_run_id": "untrusted-test"}


def craft(store: ModelStore, version: int, entries: dict[str, bytes]) -> None:
    """Rewrite version ``version``'s manifest so it also lists ``entries`` (S3 itself may refuse
    such keys; the manifest is what a writer to the bucket controls, and what is checked)."""
    manifest = store.manifest(version)
    for relative, body in entries.items():
        manifest["files"][relative] = {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
    store.client.put_object(Bucket=store.bucket, Key=store.key(version, MANIFEST),
                            Body=json.dumps(manifest).encode())


@pytest.mark.parametrize("entry, reason", [
    ("/tmp/mnist-escape-absolute", "absolute path"),
    ("../../../mnist-escape-dotdot", "'..'"),
    ("variables/../../mnist-escape-inner", "'..'"),
    ("variables//double", "empty component"),
    ("bad\x00name", "character"),
    ("assets.extra/manifest.json", "the manifest's own path"),
])
def test_a_crafted_manifest_entry_refuses_the_version_and_writes_nothing_outside(
        store: ModelStore, saved_model_dir: Path, tmp_path: Path, entry: str, reason: str) -> None:
    store.publish(saved_model_dir, LINEAGE)
    store.publish(saved_model_dir, LINEAGE)
    store.set_label("stable", 1)
    store.set_label("canary", 2)  # served, so the sync reads its manifest
    craft(store, 2, {entry: b"payload"})
    outside_before = sorted(p.name for p in tmp_path.iterdir())
    base = tmp_path / "serving" / "mnist"
    result = sync_once(store, base)
    assert set(result.refused) == {2} and reason in result.refused[2] and repr(entry) in result.refused[2]
    assert local_versions(base) == [1]  # the rest of the sync went on
    assert not list(base.glob(".sync-*")) and not Path("/tmp/mnist-escape-absolute").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(outside_before) | {"serving"})
    assert not list(tmp_path.rglob("mnist-escape-*"))
    with pytest.raises(UnsafeManifest):
        store.verify(2)


def test_symlinks_are_never_followed_out_of_the_model_directory(store: ModelStore, saved_model_dir: Path,
                                                                tmp_path: Path) -> None:
    store.publish(saved_model_dir, LINEAGE)
    base = tmp_path / "serving" / "mnist"
    base.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    os.symlink(elsewhere, base / "7")  # a version-looking symlink planted in the model directory
    result = sync_once(store, base)
    assert result.downloaded == [1] and local_versions(base) == [1]
    assert (elsewhere / "keep.txt").read_text() == "keep" and (base / "7").is_symlink()


def test_cli_sync_names_the_refused_version_and_exits_non_zero(store: ModelStore, store_env, saved_model_dir: Path,
                                                               tmp_path: Path) -> None:
    store.publish(saved_model_dir, LINEAGE)
    craft(store, 1, {"../escape": b"x"})
    result = run_mnist("sync", "--model-base-path", str(tmp_path / "m"), env=store_env)
    assert result.returncode == 1 and "version 1: manifest entry '../escape' refused" in result.stderr
    assert "Traceback" not in result.stderr
    unusable = run_mnist("sync", "--model-base-path", "/proc/x", env=store_env)
    assert unusable.returncode == 2 and "--model-base-path /proc/x: cannot use it" in unusable.stderr
    assert "Traceback" not in unusable.stderr


def test_a_file_above_the_multipart_threshold_streams_both_ways(store: ModelStore, tmp_path: Path) -> None:
    from storage.s3 import TRANSFER

    model = tmp_path / "big" / "1"
    (model / "variables").mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"not parsed by the store")
    size = TRANSFER.multipart_threshold + 3 * TRANSFER.multipart_chunksize + 12345
    with (model / "variables" / "variables.data-00000-of-00001").open("wb") as handle:
        for _ in range(size // (1 << 20)):
            handle.write(os.urandom(1 << 20))
        handle.write(os.urandom(size % (1 << 20)))
    manifest = store.publish(model, LINEAGE)
    head = store.client.head_object(Bucket=store.bucket, Key=store.key(1, "variables/variables.data-00000-of-00001"))
    assert head["ContentLength"] == size and "-" in head["ETag"]  # a multipart upload
    assert store.verify(1)["files"] == manifest["files"]
    store.download(1, tmp_path / "copy")
    big = "variables/variables.data-00000-of-00001"
    assert (tmp_path / "copy" / big).read_bytes() == (model / big).read_bytes()


def key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """An elliptic-curve key pair in PEM, as `openssl ecparam -genkey -name prime256v1` makes one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}-signing.pem", folder / f"{name}-verify.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_signed_publish_verified_sync_and_every_refusal(store: ModelStore, store_env, saved_model_dir: Path,
                                                        tmp_path: Path) -> None:
    import shutil

    from storage.signing import SIGNATURE

    ours_private, ours_public = key_pair(tmp_path, "ours")
    theirs_private, _ = key_pair(tmp_path, "theirs")
    model = tmp_path / "model"
    shutil.copytree(saved_model_dir, model)
    store.publish(model, LINEAGE, ours_private)                     # 1: signed by us
    store.publish(saved_model_dir, LINEAGE)                         # 2: unsigned
    store.publish(model, LINEAGE, theirs_private)                   # 3: signed by another key
    store.publish(model, LINEAGE, ours_private)                     # 4: signed, then tampered with
    tampered = b"tampered after signing"
    store.client.put_object(Bucket=store.bucket, Key=store.key(4, "saved_model.pb"), Body=tampered)
    manifest = store.manifest(4)  # a writer to the bucket can fix the hashes, not the signature
    manifest["files"]["saved_model.pb"] = {"sha256": hashlib.sha256(tampered).hexdigest(), "size": len(tampered)}
    store.client.put_object(Bucket=store.bucket, Key=store.key(4, MANIFEST), Body=json.dumps(manifest).encode())
    for version in (1, 2, 3, 4):
        store.set_label(f"v{version}", version)
    assert SIGNATURE in store.manifest(1)["files"] and SIGNATURE not in store.manifest(2)["files"]
    assert [row.signed for row in store.overview()] == [True, False, True, True]

    base = tmp_path / "serving" / "mnist"
    result = sync_once(store, base, verify_key=ours_public)
    assert result.downloaded == [1] and local_versions(base) == [1]
    assert "unsigned" in result.refused[2]
    assert "does not verify" in result.refused[3] and "does not verify" in result.refused[4]
    assert sync_once(store, tmp_path / "no-key" / "mnist").downloaded == [1, 2, 3, 4]  # without a key: today's

    env = {**store_env, "MNIST_VERIFY_KEY": str(ours_public)}
    good = run_mnist("registry", "verify", "1", env=env)
    assert good.returncode == 0 and "signature verified" in good.stdout
    for version, reason in ((2, "unsigned"), (3, "does not verify"), (4, "does not verify")):
        refused = run_mnist("registry", "verify", str(version), env=env)
        assert refused.returncode == 1 and reason in refused.stderr and "Traceback" not in refused.stderr
    listed = run_mnist("registry", "list", env=store_env)
    assert listed.returncode == 0 and "signed" in listed.stdout.splitlines()[0]
    everything = json.dumps([store.manifest(v) for v in (1, 2, 3, 4)]) + json.dumps(store.history())
    for key_file in (ours_private, ours_public, theirs_private):
        assert str(key_file) not in everything and key_file.read_text().splitlines()[1] not in everything


def test_a_crafted_manifests_figures_show_as_none_in_the_registry_list() -> None:
    from storage.models import version_row

    crafted = {"metrics": {"test_accuracy": "0.99; rm -rf", "slices": {"scan": True, "fax": 0.97, "x": float("nan")}},
               "dataset": {"version": "7"}, "published_at": ["not", "text"], "uri": "s3://b/m/3", "files": []}
    row = version_row(3, crafted, ["stable"])
    assert (row.test_accuracy, row.slices, row.dataset_version, row.published_at, row.uri, row.signed) == \
        (None, {"fax": 0.97}, None, None, "s3://b/m/3", False)
    assert version_row(4, {"metrics": "nonsense", "dataset": 5}, []).test_accuracy is None
