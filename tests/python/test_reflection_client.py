"""A gRPC client that knows the API only through server reflection, as
grpcurl does: no compiled stubs, message types built at run time."""

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import WsClient, run


def test_push_to_room_through_reflection_only(dev):
    channel = grpc.insecure_channel(dev.api)
    db = ProtoReflectionDescriptorDatabase(channel)
    assert "barrage.v1.PushManager" in db.get_services()
    pool = descriptor_pool.DescriptorPool(db)
    service = pool.FindServiceByName("barrage.v1.PushManager")
    method = service.methods_by_name["PushToRoom"]
    Request = GetMessageClass(method.input_type)
    Response = GetMessageClass(method.output_type)
    call = channel.unary_unary(
        "/barrage.v1.PushManager/PushToRoom",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )

    async def scenario():
        a = await WsClient.connect(f"{dev.ws}?user_id=refl-a&rooms=reflect")
        b = await WsClient.connect(f"{dev.ws}?user_id=refl-b&rooms=reflect")
        req = Request(room_id="reflect", content='{"via":"reflection"}', exclude_user_ids=["refl-b"])
        resp = call(req, timeout=10)
        assert resp.success, resp.message
        assert resp.delivered_count == 1
        m = await a.next_message()
        assert m["data"] == {"via": "reflection"} and m["id"] == resp.message_id
        await a.close()
        await b.close()

    run(scenario())
    channel.close()
