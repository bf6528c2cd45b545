"""The servers' own count of requests (weir.v1.ControlService.GetLoad), polled so that routing also sees the
requests other gateway replicas sent them; servers without the ControlService are simply not polled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc

logger = logging.getLogger(__name__)

GET_LOAD_TIMEOUT_S = 2.0


async def poll_load(channel: grpc.aio.Channel, address: str, interval_s: float, report: Callable[[int], None]) -> None:
    """Every `interval_s`, report the server's running + waiting requests over all its generation models (0 while
    it cannot be asked); stops for good on a server that does not implement GetLoad."""
    stub = inference_pb2_grpc.ControlServiceStub(channel)
    while True:
        try:
            reply = await stub.GetLoad(pb.GetLoadRequest(), timeout=GET_LOAD_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            report(0)  # stale numbers would steer requests away from a backend that may be idle by now
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                logger.info("backend %s has no GetLoad; routing on the gateway's own request counts", address)
                return
            logger.debug("GetLoad on %s failed: %s", address, e.code().name)
        else:
            report(sum(m.running + m.waiting for m in reply.models))
        await asyncio.sleep(interval_s)
