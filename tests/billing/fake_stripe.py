"""A small fake of Stripe's HTTP API: exactly the endpoints tuneloop uses, with Stripe's
semantics where they matter to billing (meter event identifiers counted once, Idempotency-Key
replay and its refusal of a reused key with other parameters, metered prices must name a meter,
Stripe's error envelope and status codes).

The real ``stripe`` SDK talks to it through ``StripeClient(base_addresses={"api": ...,
"meter_events": ...})`` — the SDK's own seam — so requests are encoded and answers parsed
exactly as against Stripe. Stripe cannot be reached from here and stripe-mock is not
installable (see the feasibility notes).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

_KEY = re.compile(r"^([^\[]+)((?:\[[^\]]*\])*)$")


def _unflatten(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (``items[0][price]=p``, ``lookup_keys[0]=k``) to nested data."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        match = _KEY.match(key)
        if match is None:
            continue
        path = [match.group(1), *re.findall(r"\[([^\]]*)\]", match.group(2))]
        node = root
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if part == "":  # ``a[]=x``: append
                part = str(len(node))
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    return _lists(root)


def _lists(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _lists(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[k] for k in sorted(node, key=int)]
    return node


class StripeFailure(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", **kw: Any):
        self.status, self.body = status, {"error": {"type": type_, "message": message, **kw}}


@dataclass
class FakeStripe:
    """The fake's state, readable by tests: what Stripe would know."""

    api_key: str = field(default_factory=lambda: f"sk_test_{secrets.token_hex(8)}")
    url: str = ""
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    products: dict[str, dict[str, Any]] = field(default_factory=dict)
    meters: dict[str, dict[str, Any]] = field(default_factory=dict)
    prices: dict[str, dict[str, Any]] = field(default_factory=dict)
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    meter_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Accepted meter events by identifier: what Stripe bills."""
    meter_event_posts: Counter[str] = field(default_factory=Counter)
    """How many times each identifier was POSTed (replays included)."""
    fail_meter_events: int = 0
    """Answer this many of the next meter event requests with a 500, as an outage would."""
    fail_customers: int = 0
    """Answer this many of the next customer creations with a 500."""
    refused_keys: int = 0
    """Requests answered 401 for a wrong API key."""
    fail_subscriptions: int = 0
    """Answer this many of the next subscription creations with a 500."""
    delay_customers_s: float = 0.0
    """Answer customer creations this much later, as a slow Stripe would."""
    _idempotent: dict[str, tuple[str, int, dict[str, Any]]] = field(default_factory=dict)
    """Idempotency-Key -> (the request's path and body, Stripe's answer)."""
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):06d}{secrets.token_hex(4)}"

    def forget_idempotency_keys(self) -> None:
        """What Stripe does after 24 hours: a reused key is a new request again."""
        with self.lock:
            self._idempotent.clear()

    def usage(self, customer: str, event_name: str) -> Decimal:
        """What Stripe's meter would aggregate (sum) for this customer."""
        return sum(
            (
                Decimal(e["payload"]["value"])
                for e in self.meter_events.values()
                if e["event_name"] == event_name and e["payload"]["stripe_customer_id"] == customer
            ),
            Decimal(0),
        )

    def event_for_customer(self, customer: str) -> list[dict[str, Any]]:
        return [
            e for e in self.meter_events.values() if e["payload"]["stripe_customer_id"] == customer
        ]

    # --- resources ----------------------------------------------------------------------------

    def create(self, path: str, p: dict[str, Any]) -> dict[str, Any]:
        if path == "/v1/customers":
            if self.fail_customers > 0:
                self.fail_customers -= 1
                raise StripeFailure(500, "fake outage", type_="api_error")
            c = {"id": self.new_id("cus"), "object": "customer", "name": p.get("name")}
            c["metadata"] = p.get("metadata", {})
            self.customers[c["id"]] = c
            return c
        if path == "/v1/products":
            pid = p.get("id") or self.new_id("prod")
            if pid in self.products:
                raise StripeFailure(400, f"Product already exists: {pid}", code="resource_exists")
            self.products[pid] = {"id": pid, "object": "product", "name": p["name"]}
            return self.products[pid]
        if path == "/v1/billing/meters":
            if any(
                m["event_name"] == p["event_name"] and m["status"] == "active"
                for m in self.meters.values()
            ):
                raise StripeFailure(400, f"A meter for {p['event_name']} already exists")
            m = {
                "id": self.new_id("mtr"),
                "object": "billing.meter",
                "status": "active",
                "event_name": p["event_name"],
                "display_name": p["display_name"],
                "default_aggregation": p["default_aggregation"],
                "customer_mapping": p["customer_mapping"],
                "value_settings": p["value_settings"],
            }
            self.meters[m["id"]] = m
            return m
        if path == "/v1/prices":
            if p.get("product") not in self.products:
                raise StripeFailure(400, f"No such product: {p.get('product')}")
            recurring = p.get("recurring") or {}
            if recurring.get("usage_type") == "metered" and recurring.get("meter") not in (
                self.meters
            ):
                raise StripeFailure(
                    400, "Metered prices must be backed by a meter (recurring[meter])."
                )
            key = p.get("lookup_key")
            holder = next((x for x in self.prices.values() if x["lookup_key"] == key), None)
            if key and holder is not None:
                if p.get("transfer_lookup_key") != "true":
                    raise StripeFailure(400, f"A price with lookup_key {key} already exists")
                holder["lookup_key"] = None
            price = {
                "id": self.new_id("price"),
                "object": "price",
                "active": True,
                "currency": p["currency"],
                "product": p["product"],
                "unit_amount_decimal": p["unit_amount_decimal"],
                "lookup_key": key,
                "recurring": recurring,
            }
            self.prices[price["id"]] = price
            return price
        if path == "/v1/subscriptions":
            if self.fail_subscriptions > 0:
                self.fail_subscriptions -= 1
                raise StripeFailure(500, "fake outage", type_="api_error")
            if p.get("customer") not in self.customers:
                raise StripeFailure(400, f"No such customer: '{p.get('customer')}'")
            items = p.get("items") or []
            for item in items:
                if item.get("price") not in self.prices:
                    raise StripeFailure(400, f"No such price: '{item.get('price')}'")
            sub = {
                "id": self.new_id("sub"),
                "object": "subscription",
                "customer": p["customer"],
                "status": "active",
                "items": {
                    "object": "list",
                    "data": [
                        {"id": self.new_id("si"), "price": self.prices[i["price"]]} for i in items
                    ],
                },
                "metadata": p.get("metadata", {}),
            }
            self.subscriptions[sub["id"]] = sub
            return sub
        if path == "/v1/billing/meter_events":
            return self.meter_event(p)
        raise StripeFailure(404, f"Unrecognized request URL (POST: {path})")

    def meter_event(self, p: dict[str, Any]) -> dict[str, Any]:
        if self.fail_meter_events > 0:
            self.fail_meter_events -= 1
            raise StripeFailure(500, "fake outage", type_="api_error")
        identifier = p.get("identifier") or self.new_id("mev")
        self.meter_event_posts[identifier] += 1
        if not any(
            m["event_name"] == p.get("event_name") and m["status"] == "active"
            for m in self.meters.values()
        ):
            raise StripeFailure(400, f"No active meter for event_name {p.get('event_name')}")
        payload = p.get("payload") or {}
        if payload.get("stripe_customer_id") not in self.customers:
            raise StripeFailure(400, f"No such customer: {payload.get('stripe_customer_id')}")
        Decimal(payload["value"])  # a number, or Stripe refuses it
        timestamp = int(p.get("timestamp") or time.time())
        if timestamp < time.time() - 35 * 86400 or timestamp > time.time() + 300:
            raise StripeFailure(400, "timestamp must be within the past 35 days")
        if identifier in self.meter_events:  # Stripe counts an identifier once
            raise StripeFailure(
                400,
                f"An event with identifier {identifier} already exists.",
                code="duplicate_meter_event",
            )
        event = {
            "object": "billing.meter_event",
            "event_name": p["event_name"],
            "identifier": identifier,
            "payload": payload,
            "timestamp": timestamp,
            "created": int(time.time()),
            "livemode": False,
        }
        self.meter_events[identifier] = event
        return event

    def retrieve(self, path: str) -> dict[str, Any]:
        kind, _, rid = path.rpartition("/")
        table = {
            "/v1/customers": self.customers,
            "/v1/products": self.products,
            "/v1/subscriptions": self.subscriptions,
            "/v1/prices": self.prices,
        }.get(kind)
        if table is None or rid not in table:
            raise StripeFailure(404, f"No such object: '{rid}'", code="resource_missing")
        return table[rid]

    def list(self, path: str, q: dict[str, Any]) -> dict[str, Any]:
        if path == "/v1/billing/meters":  # newest first, in pages, as Stripe lists
            data = [
                m for m in reversed(self.meters.values()) if q.get("status") in (None, m["status"])
            ]
            if q.get("starting_after"):
                data = data[[m["id"] for m in data].index(q["starting_after"]) + 1 :]
            limit = int(q.get("limit", 10))
            more = len(data) > limit
            return {"object": "list", "url": path, "has_more": more, "data": data[:limit]}
        elif path == "/v1/prices":
            keys = q.get("lookup_keys")
            data = [
                p
                for p in self.prices.values()
                if (keys is None or p["lookup_key"] in keys)
                and (q.get("active") is None or str(p["active"]).lower() == q["active"])
            ]
        else:
            raise StripeFailure(404, f"Unrecognized request URL (GET: {path})")
        return {"object": "list", "url": path, "has_more": False, "data": data}


def build_app(fake: FakeStripe) -> FastAPI:
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def handle(path: str, request: Request) -> JSONResponse:
        path = "/" + path
        if request.headers.get("authorization") != f"Bearer {fake.api_key}":
            fake.refused_keys += 1
            return JSONResponse(
                {"error": {"type": "invalid_request_error", "message": "Invalid API Key"}}, 401
            )
        idem = request.headers.get("idempotency-key")
        raw = (await request.body()).decode()  # before the lock: no await while holding it
        if request.method == "POST" and path == "/v1/customers" and fake.delay_customers_s:
            await asyncio.sleep(fake.delay_customers_s)
        with fake.lock:
            if request.method == "POST" and idem and idem in fake._idempotent:
                sent, status, body = fake._idempotent[idem]
                if sent != f"{path}?{raw}":  # Stripe compares the parameters of a reused key
                    return JSONResponse(
                        {
                            "error": {
                                "type": "idempotency_error",
                                "message": "Keys for idempotent requests can only be used with "
                                "the same parameters they were first used with.",
                            }
                        },
                        400,
                    )
                if path == "/v1/billing/meter_events":
                    fake.meter_event_posts[body.get("identifier", "")] += 1
                return JSONResponse(body, status, headers={"Idempotent-Replayed": "true"})
            try:
                if request.method == "POST":
                    form = _unflatten(parse_qsl(raw))
                    status, body = 200, fake.create(path, form)
                elif path in ("/v1/billing/meters", "/v1/prices"):
                    status, body = (
                        200,
                        fake.list(path, _unflatten(list(request.query_params.multi_items()))),
                    )
                else:
                    status, body = 200, fake.retrieve(path)
            except StripeFailure as failure:
                status, body = failure.status, failure.body
            # Stripe stores the answer to a keyed request, errors included, except 5xx.
            if request.method == "POST" and idem and status < 500:
                fake._idempotent[idem] = (f"{path}?{raw}", status, body)
        return JSONResponse(body, status)

    return app


class FakeStripeServer:
    """Runs the fake with uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, fake: FakeStripe) -> None:
        self.fake = fake
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        fake.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            build_app(fake), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeStripe:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the fake Stripe server did not start")
            time.sleep(0.02)
        return self.fake

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
