// The Node peer: @proca/queue 5.3.0 syncQueue() with a no-op syncer returning true.
// Usage: node peer_consumer.cjs --url U --queue Q --n N [--concurrency 10] [--keys FILE]
// With --keys, the key store (@proca/crypto format) is passed as keyStore, so every
// action's personalInfo is decrypted (tweetnacl, pure JS) and merged into the contact.
// Prints BENCH_RESULT {"seconds": …, "acked": N}: from the syncQueue() call (which
// connects) until the library has counted N acks; then closes through the library's own
// shutdown (SIGINT handler), so every ack frame is flushed before the process exits.
'use strict';
const { syncQueue, count } = require('@proca/queue');
const { loadKeyStoreFromFile } = require('@proca/crypto');
const { parseArgs, report } = require('./common.cjs');

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const n = Number(args.n);
  const concurrency = Number(args.concurrency || 10);
  const keyStore = args.keys ? loadKeyStoreFromFile(args.keys) : undefined;
  let seen = 0;
  let contacts = 0;
  let resolveDone;
  const done = new Promise((resolve) => { resolveDone = resolve; });
  const waitAcks = () => {
    // count.ack is incremented just before the library returns ACK for the message.
    if (count.ack >= n) resolveDone(performance.now());
    else setImmediate(waitAcks);
  };
  const syncer = async (action) => {
    seen += 1;
    if (action.contact && action.contact.email) contacts += 1;
    if (seen === n) setImmediate(waitAcks);
    return true;
  };
  const started = performance.now();
  await syncQueue(args.url, args.queue, syncer, { concurrency, keyStore, tag: 'proca-sync-bench' });
  const finished = await done;
  report({ seconds: (finished - started) / 1000, acked: count.ack, nacked: count.nack, withEmail: contacts });
  setImmediate(() => process.kill(process.pid, 'SIGINT'));
}

main().catch((err) => { console.error(err); process.exit(1); });
