#!/usr/bin/env python3
"""libvirt lifecycle events to NATS JetStream and/or Kafka as JSON.

The bridge a user writes in an afternoon, kept as the baseline of
`cargo bench --bench source` (benches/source.rs):

    bridge.py --uri URI [--nats URL --subject S] [--kafka BOOTSTRAP --topic T]
              [--await-each]

libvirt-python's default event loop on a thread, one lifecycle callback for
every domain, json.dumps({uuid, name, event, detail, time}), then
- NATS: a JetStream publish to S.<uuid> whose acknowledgement is awaited
  (nats-py publish_async: up to 4,000 in flight);
- Kafka: a confluent-kafka Producer (acks=all) keyed by the uuid, delivery
  reports polled on a thread.
With --await-each, one event at a time instead: the callback queues the
event to one asyncio task, which awaits its JetStream publish (js.publish)
and/or produces it and waits for its delivery (producer.flush()) before
taking the next.
No journal, no sequence numbers, no enrichment, no retries.

Prints "ready" once subscribed and connected, "acked nats=N kafka=M ..."
every second, and after SIGTERM (once what is in flight is acknowledged, or
after 30 s) that line once more prefixed with "final", then exits.
"""

import argparse
import asyncio
import json
import signal
import sys
import threading
import time

import libvirt

EVENTS = (
    "DEFINED",
    "UNDEFINED",
    "STARTED",
    "SUSPENDED",
    "RESUMED",
    "STOPPED",
    "SHUTDOWN",
    "PMSUSPENDED",
    "CRASHED",
)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", default="qemu:///system")
    ap.add_argument("--nats", metavar="URL")
    ap.add_argument("--subject", default="libvirt.events")
    ap.add_argument("--kafka", metavar="BOOTSTRAP")
    ap.add_argument("--topic", default="libvirt.events")
    ap.add_argument(
        "--await-each",
        action="store_true",
        help="publish one event at a time, each acknowledged before the next",
    )
    args = ap.parse_args()
    if not args.nats and not args.kafka:
        ap.error("give --nats and/or --kafka")
    return args


def run_libvirt_loop():
    while True:
        libvirt.virEventRunDefaultImpl()


async def main(args):
    loop = asyncio.get_running_loop()
    counts = {"received": 0, "nats": 0, "kafka": 0, "failed": 0}

    js = None
    outbox = asyncio.Queue()
    if args.nats:
        import nats

        nc = await nats.connect(args.nats)
        js = nc.jetstream()

    producer = None
    if args.kafka:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": args.kafka, "acks": "all"})

    def delivered(err, _msg):
        if err is None:
            counts["kafka"] += 1
        else:
            counts["failed"] += 1
            print(f"kafka: {err}", file=sys.stderr, flush=True)

    def on_lifecycle(_conn, dom, event, detail, _opaque):
        uuid = dom.UUIDString()
        body = json.dumps(
            {
                "uuid": uuid,
                "name": dom.name(),
                "event": EVENTS[event] if 0 <= event < len(EVENTS) else str(event),
                "detail": detail,
                "time": time.time(),
            }
        ).encode()
        counts["received"] += 1
        if args.await_each:
            loop.call_soon_threadsafe(outbox.put_nowait, (uuid, body))
            return
        if producer is not None:
            while True:
                try:
                    producer.produce(
                        args.topic, key=uuid, value=body, on_delivery=delivered
                    )
                    break
                except BufferError:
                    time.sleep(0.01)  # the poll thread makes room
        if js is not None:
            loop.call_soon_threadsafe(outbox.put_nowait, (uuid, body))

    libvirt.virEventRegisterDefaultImpl()
    conn = libvirt.openReadOnly(args.uri)
    conn.domainEventRegisterAny(
        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None
    )
    threading.Thread(target=run_libvirt_loop, daemon=True).start()

    def on_ack(fut):
        if fut.cancelled() or fut.exception() is not None:
            counts["failed"] += 1
            print(f"nats: {fut.exception()}", file=sys.stderr, flush=True)
        else:
            counts["nats"] += 1

    async def publish():
        while True:
            uuid, body = await outbox.get()
            fut = await js.publish_async(f"{args.subject}.{uuid}", body)
            fut.add_done_callback(on_ack)
            outbox.task_done()

    async def publish_each():
        while True:
            uuid, body = await outbox.get()
            if js is not None:
                try:
                    await js.publish(f"{args.subject}.{uuid}", body)
                    counts["nats"] += 1
                except Exception as e:
                    counts["failed"] += 1
                    print(f"nats: {e!r}", file=sys.stderr, flush=True)
            if producer is not None:
                producer.produce(
                    args.topic, key=uuid, value=body, on_delivery=delivered
                )
                producer.flush()
            outbox.task_done()

    publisher = None
    if args.await_each:
        publisher = asyncio.create_task(publish_each())
    elif js is not None:
        publisher = asyncio.create_task(publish())

    stopping = threading.Event()

    def poll_kafka():
        while not stopping.is_set():
            producer.poll(0.1)

    poller = None
    if producer is not None and not args.await_each:
        poller = threading.Thread(target=poll_kafka, daemon=True)
        poller.start()

    def report(prefix=""):
        print(
            f"{prefix}acked nats={counts['nats']} kafka={counts['kafka']} "
            f"received={counts['received']} failed={counts['failed']}",
            flush=True,
        )

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            report()

    deadline = time.monotonic() + 30
    if publisher is not None:
        try:
            await asyncio.wait_for(outbox.join(), 30)
            if js is not None and not args.await_each:
                await asyncio.wait_for(
                    js.publish_async_completed(),
                    max(0.1, deadline - time.monotonic()),
                )
        except asyncio.TimeoutError:
            print(
                f"unacknowledged at stop ({outbox.qsize()} not yet published)",
                file=sys.stderr,
                flush=True,
            )
        publisher.cancel()
    if producer is not None:
        if poller is not None:
            stopping.set()
            poller.join()
        left = producer.flush(max(0.1, deadline - time.monotonic()))
        if left:
            print(f"kafka: {left} unacknowledged at stop", file=sys.stderr, flush=True)
    report("final ")
    conn.close()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
