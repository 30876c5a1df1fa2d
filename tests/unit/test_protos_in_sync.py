"""The committed generated code must be exactly what `make proto` produces from protos/."""

from pathlib import Path

from tools import protogen


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in protogen.generate(tmp_path)}
    committed = {p.relative_to(protogen.ROOT): p.read_bytes() for p in protogen.committed_files()}
    assert sorted(fresh) == sorted(committed), "generated files differ: run `make proto`"
    stale = [str(path) for path, content in fresh.items() if committed[path] != content]
    assert not stale, f"out of sync with protos/: {stale} — run `make proto`"


def test_every_proto_package_matches_its_folder() -> None:
    for proto in protogen.proto_files():
        rel = proto.relative_to(protogen.PROTO_ROOT).parent
        package = next(
            line.split()[1].rstrip(";")
            for line in proto.read_text().splitlines()
            if line.startswith("package ")
        )
        assert package == ".".join(rel.parts), f"{proto}: package {package} does not match {rel}"
