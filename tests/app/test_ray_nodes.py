"""The ports a local Ray node is started with: each component its own, never one handed out twice."""

from app.ray_nodes import free_ports, node_ports


def test_ports_are_distinct_within_a_call_and_across_calls() -> None:
    first = free_ports(40)
    assert len(set(first)) == 40
    assert not set(first) & set(free_ports(40)), "a port given to one component is never given to another"


def test_a_nodes_components_get_ports_of_their_own() -> None:
    ports = node_ports([])
    single = [v for k, v in ports.items() if k not in ("min-worker-port", "max-worker-port")]
    assert len(set(single)) == len(single)
