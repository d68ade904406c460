'use strict';
// Shared by the bench's Node scripts: "--key value" arguments and the result line.

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--')) throw new Error(`unexpected argument ${argv[i]}`);
    out[argv[i].slice(2)] = argv[i + 1];
  }
  for (const required of ['url', 'queue', 'n']) {
    if (!(required in out)) throw new Error(`--${required} is required`);
  }
  return out;
}

// One line the harness looks for: the peer library also logs on stdout.
function report(result) {
  process.stdout.write(`BENCH_RESULT ${JSON.stringify(result)}\n`);
}

module.exports = { parseArgs, report };
