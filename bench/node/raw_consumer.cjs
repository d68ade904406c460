// Minimal Node consumer (rabbitmq-client 5.0.8): drains a queue, nothing else.
// Prefetch 1000 and one basic.ack(multiple) per quarter of the prefetch, like the aiormq
// baseline. Usage: node raw_consumer.cjs --url U --queue Q --n N [--prefetch 1000]
// Prints one line: BENCH_RESULT {"seconds": …, "acked": N} — from the start of the
// connection until the N-th message is acked.
'use strict';
const { Connection } = require('rabbitmq-client');
const { parseArgs, report } = require('./common.cjs');

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const n = Number(args.n);
  const prefetch = Number(args.prefetch || 1000);
  const every = Math.max(1, Math.floor(prefetch / 4));
  const started = performance.now();
  const rabbit = new Connection(args.url);
  const ch = await rabbit.acquire();
  await ch.basicQos({ prefetchCount: prefetch });
  let count = 0;
  let resolveDone;
  const done = new Promise((resolve) => { resolveDone = resolve; });
  const { consumerTag } = await ch.basicConsume({ queue: args.queue, noAck: false }, (msg) => {
    count += 1;
    if (count % every === 0 || count >= n) ch.basicAck({ deliveryTag: msg.deliveryTag, multiple: true });
    if (count === n) resolveDone(performance.now());
  });
  const finished = await done;
  await ch.basicCancel({ consumerTag });
  await ch.close();
  await rabbit.close();
  report({ seconds: (finished - started) / 1000, acked: count });
}

main().catch((err) => { console.error(err); process.exit(1); });
