// A Node.js inbound-call server written the way a typical `ws` user would: answer on
// incoming_call, echo audio, wait for the CDR after hangup, then close.
'use strict';
const { WebSocketServer } = require('ws');

const [host, port] = (process.argv[2] || '127.0.0.1:4151').split(':');
const wss = new WebSocketServer({ host, port: Number(port) });

wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    if (isBinary) {
      ws.send(data);
      return;
    }
    let msg;
    try {
      msg = JSON.parse(data.toString());
    } catch (e) {
      ws.close(1007, 'invalid JSON');
      return;
    }
    if (msg.event === 'incoming_call') {
      ws.send(JSON.stringify({ event: 'answer' }));
    } else if (msg.event === 'cdr') {
      ws.close(1000, 'call ended');
    }
  });
});
