"""The local SMS sink: the Twilio Messages API shape over real HTTP, each accepted message a file."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from relevans.local.sms_sink import SmsSink, read_sms_dir

AUTH = {"Authorization": aiohttp.encode_basic_auth("AC1", "token")}
FORM = {"To": "+46701234567", "From": "relevans", "Body": "Hej Åse 😀"}


async def test_an_accepted_message_is_stored_before_the_201(tmp_path: Path) -> None:
    async with SmsSink(tmp_path / "sms") as sink, aiohttp.ClientSession() as http:
        url = f"{sink.url}/2010-04-01/Accounts/AC1/Messages.json"
        async with http.post(url, data=FORM, headers=AUTH) as reply:
            assert reply.status == 201
            answer = await reply.json()
        [stored] = read_sms_dir(tmp_path / "sms")
        assert stored == sink.messages()[0]
        assert (stored.sid, stored.account_sid) == (answer["sid"], "AC1")
        assert (stored.to, stored.sender, stored.body) == ("+46701234567", "relevans", "Hej Åse 😀")
        assert answer["sid"].startswith("SM") and answer["status"] == "queued"
        [path] = (tmp_path / "sms").glob("*.json")
        assert json.loads(path.read_text("utf-8"))["body"] == "Hej Åse 😀"
        assert list((tmp_path / "sms").glob(".*")) == []  # no temporary file left


async def test_unauthenticated_and_incomplete_requests_are_refused_and_not_stored(tmp_path: Path) -> None:
    async with SmsSink(tmp_path / "sms") as sink, aiohttp.ClientSession() as http:
        url = f"{sink.url}/2010-04-01/Accounts/AC1/Messages.json"
        async with http.post(url, data=FORM) as reply:
            assert reply.status == 401
        other = {
            "Authorization": aiohttp.encode_basic_auth("AC2", "token")
        }  # the account of the URL is the user name
        async with http.post(url, data=FORM, headers=other) as reply:
            assert reply.status == 401
        async with http.post(url, data={**FORM, "Body": ""}, headers=AUTH) as reply:
            assert reply.status == 400
            assert (await reply.json())["code"] == 21602
        async with http.post(url, data={"From": "x", "Body": "y"}, headers=AUTH) as reply:
            assert (await reply.json())["code"] == 21604
        assert sink.messages() == []
    assert read_sms_dir(tmp_path / "nowhere") == []
