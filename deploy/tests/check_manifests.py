#!/usr/bin/env python3
"""YAML-level checks of deploy/ that need a YAML parser (PyYAML).

Run by ka-agent/tests/deploy.rs with the Python of its tool environment
(PyYAML comes with kubernetes-validate); usable by hand too:

  check_manifests.py equal A.yaml B.yaml    same objects, same fields
  check_manifests.py security FILE...       no privileged container, no ALL
                                            capability; the DaemonSet's set
                                            equals the systemd unit's and
                                            docs/security.md's
  check_manifests.py rules RULES.yaml PROMETHEUSRULE.yaml
                                            the PrometheusRule's groups are
                                            the rules file's

Exit status 0 when the check holds, 1 with the differences on stderr.
"""

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def documents(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def key(obj):
    meta = obj.get("metadata", {})
    return (obj.get("apiVersion"), obj.get("kind"), meta.get("namespace", ""), meta.get("name"))


def diff(a, b, path=""):
    """Human-readable differences between two YAML values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{path}.{k}: only in the second")
            elif k not in b:
                out.append(f"{path}.{k}: only in the first")
            else:
                out.extend(diff(a[k], b[k], f"{path}.{k}"))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(diff(x, y, f"{path}[{i}]"))
        return out
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def equal(first, second):
    a = {key(d): d for d in documents(first)}
    b = {key(d): d for d in documents(second)}
    problems = []
    for k in sorted(set(a) | set(b), key=str):
        if k not in b:
            problems.append(f"{k}: only in {first}")
        elif k not in a:
            problems.append(f"{k}: only in {second}")
        else:
            problems.extend(f"{k}{d}" for d in diff(a[k], b[k]))
    if not a:
        problems.append(f"{first}: no objects")
    return problems, f"{len(a)} objects equal"


def pod_specs(obj):
    spec = obj.get("spec", {})
    if obj.get("kind") == "Pod":
        yield spec
    elif "template" in spec:
        yield spec["template"].get("spec", {})
    elif "jobTemplate" in spec:
        yield spec["jobTemplate"]["spec"]["template"].get("spec", {})


def unit_capabilities():
    unit = (ROOT / "deploy/systemd/ka-agent.service").read_text(encoding="utf-8")
    sets = {}
    for line in unit.splitlines():
        m = re.match(r"^(AmbientCapabilities|CapabilityBoundingSet)=(.*)$", line.strip())
        if m:
            sets[m.group(1)] = {c.removeprefix("CAP_") for c in m.group(2).split()}
    return sets


def documented_capabilities():
    text = (ROOT / "docs/security.md").read_text(encoding="utf-8")
    table = text.split("## Capabilities", 1)[1].split("Not needed", 1)[0]
    return set(re.findall(r"^\| `CAP_([A-Z_]+)` \|", table, re.MULTILINE))


def security(paths):
    problems, containers, daemonset_caps = [], 0, None
    for path in paths:
        for obj in documents(path):
            for spec in pod_specs(obj):
                for c in spec.get("initContainers", []) + spec.get("containers", []):
                    containers += 1
                    where = f"{path}: {obj['kind']}/{obj['metadata']['name']} container {c['name']}"
                    sc = c.get("securityContext", {})
                    if sc.get("privileged") is not False:
                        problems.append(f"{where}: privileged must be set to false (is {sc.get('privileged')!r})")
                    caps = sc.get("capabilities", {})
                    added = {str(x).removeprefix("CAP_") for x in caps.get("add", [])}
                    if "ALL" in added:
                        problems.append(f"{where}: adds ALL capabilities")
                    if "ALL" not in caps.get("drop", []):
                        problems.append(f"{where}: does not drop ALL before adding")
                    if spec.get("securityContext", {}).get("privileged"):
                        problems.append(f"{where}: privileged pod")
                    if obj["kind"] == "DaemonSet":
                        daemonset_caps = added
    if containers == 0:
        problems.append("no container found")
    if daemonset_caps is not None:
        unit = unit_capabilities()
        documented = documented_capabilities()
        for name, caps in [("systemd AmbientCapabilities", unit.get("AmbientCapabilities")),
                           ("systemd CapabilityBoundingSet", unit.get("CapabilityBoundingSet")),
                           ("docs/security.md", documented)]:
            if caps != daemonset_caps:
                problems.append(f"DaemonSet capabilities {sorted(daemonset_caps)} != {name} {sorted(caps or [])}")
    return problems, f"{containers} container(s): none privileged, no ALL; one capability set everywhere"


def rules(rules_file, prometheus_rule):
    plain = documents(rules_file)[0]
    [crd] = documents(prometheus_rule)
    if crd.get("kind") != "PrometheusRule":
        return [f"{prometheus_rule}: not a PrometheusRule"], ""
    problems = [f"spec{d}" for d in diff(crd["spec"], plain)]
    return problems, f"{sum(len(g['rules']) for g in plain['groups'])} rules equal"


def main(argv):
    commands = {
        "equal": lambda a: equal(*a),
        "security": security,
        "rules": lambda a: rules(*a),
    }
    if len(argv) < 2 or argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    problems, summary = commands[argv[1]](argv[2:])
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
