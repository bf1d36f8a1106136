#!/usr/bin/env python3
"""Independent reader of virtstream's events stream/topic.

Reads every message of the NATS JetStream events stream or the Kafka
events topic with the official clients (nats-py, confluent-kafka), decodes
the Avro bodies with fastavro straight from the .avsc files in schemas/,
finding each message's schema by its single-object fingerprint (not with
virtstream's decoder), and prints one JSON object per message:

  {"pos": "...", "host_id", "epoch", "host_seq", "seq", "uuid", "name",
   "event", "detail", "origin", "state", "persistent", "observed_at",
   "ce_id"}

`pos` is the stream sequence (NATS) or "partition:offset" (Kafka).
Messages are printed in stream order (NATS) or per partition in offset
order (Kafka). Exit 0 on success, 2 on anything undecodable.

  read_events.py nats  URL   [--stream VIRT_EVENTS]
  read_events.py kafka BOOTSTRAP [--topic virt.domain.events.v1]

With --registry URL, every body must be in the schema-registry framing
(byte 0 + 4-byte schema id + datum) and is decoded by confluent-kafka's
SchemaRegistryClient + AvroDeserializer, not from schemas/; rows then
carry "schema_id". --registry-user/--registry-password-file give basic
auth; --registry-topic names the topic whose `<topic>-value` subject the
deserializer is told about (default: the Kafka topic; for NATS pass the
events subject prefix).
"""

import argparse
import asyncio
import datetime
import io
import json
import os
import sys

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMAS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "schemas")


def load_schemas():
    """Parsed schemas by the fingerprint fastavro computes (CRC-64-AVRO of
    the Parsing Canonical Form, hex of the 8 header bytes), from the .avsc
    files alone; with the name the `virtstream-schema` header carries
    (io.virtstream.<Record>.v<N>, from the file name <Record>.v<N>.avsc)."""
    out = {}
    for f in sorted(os.listdir(SCHEMAS)):
        if f.endswith(".avsc"):
            with open(os.path.join(SCHEMAS, f)) as fh:
                parsed = fastavro.parse_schema(json.load(fh))
            fp = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
            out[fp] = ("io.virtstream." + f[: -len(".avsc")], parsed)
    return out


def decode(schemas, headers, body):
    ctype = headers.get("content-type", "application/avro")
    if ctype == "application/json":
        return json.loads(body)
    # Avro single-object encoding: C3 01, 8-byte fingerprint, datum. The
    # schema is found by the fingerprint alone, as any single-object
    # reader finds it; the name header must agree.
    if body[:2] != b"\xc3\x01":
        raise ValueError(f"not single-object encoded (starts {body[:2].hex()})")
    fp = body[2:10].hex()
    if fp not in schemas:
        raise ValueError(f"no schema in schemas/ has fingerprint {fp}")
    name, schema = schemas[fp]
    if headers.get("virtstream-schema", name) != name:
        raise ValueError(f"fingerprint {fp} is {name}, header says {headers.get('virtstream-schema')}")
    if headers.get("virtstream-schema-fingerprint", fp) != fp:
        raise ValueError(f"fingerprint {fp} in the body, {headers.get('virtstream-schema-fingerprint')} in the header")
    return fastavro.schemaless_reader(io.BytesIO(body[10:]), schema)


def registry_decoder(url, user, password_file, topic):
    """Decodes registry-framed bodies with confluent-kafka's own client."""
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    conf = {"url": url}
    if user:
        with open(password_file) as fh:
            conf["basic.auth.user.info"] = f"{user}:{fh.read().strip()}"
    des = AvroDeserializer(SchemaRegistryClient(conf))
    ctx = SerializationContext(topic, MessageField.VALUE)

    def dec(headers, body):
        if body[:1] != b"\x00" or len(body) < 5:
            raise ValueError(f"not schema-registry framed (starts {body[:1].hex()})")
        return des(body, ctx), int.from_bytes(body[1:5], "big")

    return dec


EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def micros(v):
    """timestamp-micros: fastavro returns an aware datetime."""
    if isinstance(v, datetime.datetime):
        return (v - EPOCH) // datetime.timedelta(microseconds=1)
    return v


def row(pos, headers, rec):
    return {
        "pos": pos,
        "host_id": rec["host_id"],
        "epoch": rec["epoch"],
        "host_seq": rec["host_seq"],
        "seq": rec["seq"],
        "uuid": str(rec["domain"]["uuid"]),
        "name": rec["domain"]["name"],
        "event": rec["event"],
        "detail": rec["detail"],
        "origin": rec["origin"],
        "state": rec["state_after"]["state"],
        "persistent": rec["persistent"],
        "observed_at": micros(rec["observed_at"]),
        "ce_id": headers.get("ce_id"),
    }


async def read_nats(url, stream, emit):
    import nats
    from nats.js.api import ConsumerConfig, DeliverPolicy, AckPolicy

    nc = await nats.connect(url, connect_timeout=10)
    js = nc.jetstream()
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        await nc.close()
        return
    last = info.state.last_seq
    if info.state.messages == 0:
        await nc.close()
        return
    sub = await js.pull_subscribe(
        ">",
        durable=None,
        stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
    )
    seen = 0
    while True:
        try:
            msgs = await sub.fetch(500, timeout=5)
        except nats.errors.TimeoutError:
            raise RuntimeError(f"stream {stream}: no messages after {seen} of up to seq {last}")
        done = False
        for m in msgs:
            seen += 1
            headers = dict(m.headers or {})
            emit(str(m.metadata.sequence.stream), headers, m.data)
            if m.metadata.num_pending == 0 or m.metadata.sequence.stream >= last:
                done = True
        if done:
            break
    await nc.close()


def read_kafka(bootstrap, topic, emit):
    from confluent_kafka import Consumer, TopicPartition, KafkaError, OFFSET_BEGINNING

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "virtstream-oracle",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    md = c.list_topics(topic, timeout=10)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        c.close()
        return
    parts = sorted(t.partitions)
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    at_eof = set()
    by_part = {p: [] for p in parts}
    idle = 0
    while len(at_eof) < len(parts):
        m = c.poll(1.0)
        if m is None:
            idle += 1
            if idle > 30:
                raise RuntimeError(f"topic {topic}: partitions {set(parts) - at_eof} never reached their end")
            continue
        idle = 0
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                at_eof.add(m.partition())
                continue
            raise RuntimeError(str(m.error()))
        at_eof.discard(m.partition())
        headers = {k: (v.decode() if v is not None else None) for k, v in (m.headers() or [])}
        by_part[m.partition()].append((m.offset(), headers, m.value()))
    c.close()
    for p in parts:
        for off, headers, value in by_part[p]:
            emit(f"{p}:{off}", headers, value)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bus", choices=["nats", "kafka"])
    ap.add_argument("address")
    ap.add_argument("--stream", default="VIRT_EVENTS")
    ap.add_argument("--topic", default="virt.domain.events.v1")
    ap.add_argument("--registry")
    ap.add_argument("--registry-user")
    ap.add_argument("--registry-password-file")
    ap.add_argument("--registry-topic")
    a = ap.parse_args()
    schemas = load_schemas()
    via_registry = None
    if a.registry:
        via_registry = registry_decoder(
            a.registry, a.registry_user, a.registry_password_file, a.registry_topic or a.topic
        )
    bad = 0

    def emit(pos, headers, body):
        nonlocal bad
        schema_id = None
        try:
            if via_registry:
                rec, schema_id = via_registry(headers, body)
            else:
                rec = decode(schemas, headers, body)
        except Exception as e:  # report and go on: every message is accounted for
            bad += 1
            print(f"undecodable message at {pos}: {e}", file=sys.stderr)
            return
        r = row(pos, headers, rec)
        if schema_id is not None:
            r["schema_id"] = schema_id
        print(json.dumps(r))

    if a.bus == "nats":
        asyncio.run(read_nats(a.address, a.stream, emit))
    else:
        read_kafka(a.address, a.topic, emit)
    sys.exit(2 if bad else 0)


if __name__ == "__main__":
    main()
