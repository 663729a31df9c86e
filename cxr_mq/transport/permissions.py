"""Least-privilege RabbitMQ permissions for each party: one broker user per party, named by
the party's id.

RabbitMQ checks three regular expressions per user and vhost (``configure``, ``write``,
``read``) against exchange and queue names, and, for topic exchanges, two more (``write``,
``read``) against routing keys. What each AMQP operation needs:

- declaring (not passively) or deleting a queue or exchange: configure on it;
- publishing: write on the exchange (and a topic ``write`` match on the routing key);
- binding a queue to an exchange: write on the queue, read on the exchange (and a topic
  ``read`` match on the binding key);
- consuming or ``basic.get``: read on the queue; a passive declare needs nothing.

So, in namespace ``ns``:

============  ================  ============================  ============================
party         configure         write                         read
============  ================  ============================  ============================
hospital h    nothing           ``ns.control`` (key           ``ns.hospital.h``
                                ``update_ready``), ``ns.dlx``
aggregator    nothing           ``ns.control`` (keys          ``ns.aggregator``
                                ``model_ready``,
                                ``round_aborted``), ``ns.dlx``
controller    ``amq.gen-*``     ``ns.control`` (key           ``ns.control`` (binding keys
              (its own          ``round_start``), ``amq.gen-*``  ``model_ready``,
              reply queue)                                    ``round_aborted``), ``amq.gen-*``
admin         everything        everything                    everything
============  ================  ============================  ============================

``ns.dlx`` is where a worker dead-letters a refused message (the consumer republishes it with
its reason). Nobody but the admin declares the durable topology (``cxr-mq broker declare``);
workers check passively that it is there. The controller's reply queue is server-named
(``amq.gen-...``) and exclusive to its connection, so no other connection can touch it;
names starting ``amq.`` cannot be chosen by a client. The user name is the party's id, so
RabbitMQ's ``user_id`` validation proves which party's login published a message.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .base import Topology

ROLES = ("hospital", "aggregator", "controller", "admin")
NOTHING = "^$"
TEMPORARY_QUEUES = r"amq\.gen-.*"
# routing keys each role may publish on (and, for the controller, bind its reply queue to)
PUBLISHES = {"hospital": ("update_ready",), "aggregator": ("model_ready", "round_aborted"),
             "controller": ("round_start", "ceremony_start", "ceremony_finalize")}
WAITS_FOR = {"controller": ("model_ready", "round_aborted")}


@dataclass(frozen=True)
class Permissions:
    """``rabbitmqctl set_permissions`` and ``set_topic_permissions`` for one user."""

    user: str
    role: str
    configure: str
    write: str
    read: str
    topic_exchange: str
    topic_write: str
    topic_read: str

    def to_dict(self) -> dict:
        return asdict(self)

    def allows(self, kind: str, name: str) -> bool:
        """Whether the ``configure``, ``write`` or ``read`` regex matches ``name``
        (RabbitMQ's semantics: an unanchored search, so the regexes carry their anchors)."""
        return re.search(getattr(self, kind), name) is not None

    def allows_topic(self, kind: str, exchange: str, routing_key: str) -> bool:
        if exchange != self.topic_exchange:
            return True
        return re.search(getattr(self, f"topic_{kind}"), routing_key) is not None

    def rabbitmqctl(self, vhost: str = "/") -> list[list[str]]:
        """The ``rabbitmqctl`` argument lists that apply these permissions."""
        return [["set_permissions", "-p", vhost, self.user, self.configure, self.write, self.read],
                ["set_topic_permissions", "-p", vhost, self.user, self.topic_exchange,
                 self.topic_write, self.topic_read]]


def _any_of(*names: str) -> str:
    return "^(" + "|".join(names) + ")$"


def permissions_for(role: str, party_id: str, namespace: str = "cxr") -> Permissions:
    """The least privilege a party of ``role`` needs in ``namespace``."""
    if role not in ROLES:
        raise ValueError(f"invalid role {role!r}: one of {', '.join(ROLES)}")
    t = Topology(namespace)
    control, dlx = re.escape(t.control_exchange), re.escape(t.dead_letter_exchange)
    if role == "admin":
        return Permissions(party_id, role, ".*", ".*", ".*", t.control_exchange, ".*", ".*")
    topic_write = _any_of(*PUBLISHES[role])
    topic_read = _any_of(*WAITS_FOR[role]) if role in WAITS_FOR else NOTHING
    if role == "hospital":
        read = _any_of(re.escape(t.hospital_queue(party_id)))
        return Permissions(party_id, role, NOTHING, _any_of(control, dlx), read,
                           t.control_exchange, topic_write, topic_read)
    if role == "aggregator":
        return Permissions(party_id, role, NOTHING, _any_of(control, dlx),
                           _any_of(re.escape(t.aggregator_queue)), t.control_exchange,
                           topic_write, topic_read)
    return Permissions(party_id, role, _any_of(TEMPORARY_QUEUES), _any_of(control, TEMPORARY_QUEUES),
                       _any_of(control, TEMPORARY_QUEUES), t.control_exchange, topic_write, topic_read)
