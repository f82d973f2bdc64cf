#!/usr/bin/env node
// A voice bot that speaks Twilio Media Streams, written the way a Node user writes one with the
// `ws` package, put on callgate calls by a `bridge` route (docs/bridge.md). The same bot as
// echo_bot.py: it echoes what the caller says in 200 ms replies, each followed by a mark; once
// its fifth reply has been heard (the mark came back) it says goodbye and closes the socket,
// which makes callgate hang up after the goodbye. Every event it sees is printed as one JSON
// line. Needs `ws` (`npm install ws`); run it with `node echo_bot.js 8765`.
'use strict';
const { WebSocketServer } = require('ws');

const GOODBYE = Buffer.alloc(4000, 0x2a); // 500 ms of μ-law

const log = (fields) => console.log(JSON.stringify(fields));

const server = new WebSocketServer({ host: '127.0.0.1', port: Number(process.argv[2] || 0) });
server.on('listening', () => log({ event: 'listening', port: server.address().port }));

server.on('connection', (ws, request) => {
  let sid = null;
  let heard = Buffer.alloc(0);
  let replies = 0;
  const send = (message) => ws.send(JSON.stringify({ streamSid: sid, ...message }));
  ws.on('message', (data, isBinary) => {
    if (isBinary) return;
    const msg = JSON.parse(data.toString());
    switch (msg.event) {
      case 'start': // after `connected`: the ids and the call's parameters
        sid = msg.start.streamSid;
        log({
          event: 'start',
          call_sid: msg.start.callSid,
          params: msg.start.customParameters,
          path: request.url,
          signature: request.headers['x-twilio-signature'] ?? null,
        });
        break;
      case 'media':
        heard = Buffer.concat([heard, Buffer.from(msg.media.payload, 'base64')]);
        if (heard.length >= 1600 && replies < 5) {
          replies += 1;
          const reply = heard.subarray(0, 1600);
          heard = heard.subarray(1600);
          send({ event: 'media', media: { payload: reply.toString('base64') } });
          send({ event: 'mark', mark: { name: `reply-${replies}` } });
        }
        break;
      case 'dtmf':
        log({ event: 'dtmf', digit: msg.dtmf.digit });
        break;
      case 'mark': // played to the caller
        log({ event: 'mark', name: msg.mark.name });
        if (msg.mark.name === 'reply-5') {
          send({ event: 'media', media: { payload: GOODBYE.toString('base64') } });
          ws.close(1000, 'goodbye'); // callgate hangs up after the goodbye
        }
        break;
      case 'stop':
        log({ event: 'stop' });
        break;
      default:
        break;
    }
  });
});
