// The web UI's pure model code (web/src/model.js), in node: how the console panel keeps a
// console it follows (appendConsole). Run: node --test tests/web/model.test.mjs
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { appendConsole } from '../../web/src/model.js';

const fresh = { text: '', next: null, cut: false, site: '', cuts: 0 };
const read = (over) => ({ site: 'primary', offset: 0, next: 0, size: 0, text: '', cuts: 0, cut_size: 0, ...over });

test('the first read is the tail; a following read appends', () => {
  let k = appendConsole(fresh, read({ offset: 100, next: 110, size: 110, text: 'boot ok\n' }));
  assert.deepEqual([k.text, k.next, k.cut, k.site], ['boot ok\n', 110, true, 'primary']);
  k = appendConsole(k, read({ offset: 110, next: 115, size: 115, text: 'more\n' }));
  assert.deepEqual([k.text, k.next], ['boot ok\nmore\n', 115]);
});

test('a cut since the last read drops what came back, says how much was not shown, and reads from 0 next', () => {
  let k = appendConsole(fresh, read({ next: 5000, size: 5000, text: 'old\n' }));
  // The site cut the log at 70000 bytes; the log grew past 5000 again: this read came from
  // the new log at the old offset.
  k = appendConsole(k, read({ offset: 5000, next: 6000, size: 6000, text: 'NEW-AT-OLD-OFFSET\n', cuts: 1, cut_size: 70000 }));
  assert.equal(k.next, 0);
  assert.equal(k.cuts, 1);
  assert.ok(!k.text.includes('NEW-AT-OLD-OFFSET'), k.text);
  assert.match(k.text, /^old\n\[the console log was moved aside at the site; 63\.?\d* KiB of it not shown\]\n$/);
  k = appendConsole(k, read({ offset: 0, next: 6000, size: 6000, text: 'new log\n', cuts: 1, cut_size: 70000 }));
  assert.match(k.text, /not shown\]\nnew log\n$/);
  assert.equal(k.next, 6000);
});

test('more than one cut says some is not shown, without a number', () => {
  let k = appendConsole(fresh, read({ next: 10, size: 10, text: 'a\n' }));
  k = appendConsole(k, read({ offset: 10, next: 20, size: 20, text: 'x\n', cuts: 3, cut_size: 90000 }));
  assert.match(k.text, /\[the console log was moved aside at the site; some of it is not shown\]\n$/);
  assert.equal(k.next, 0);
});

test('a failover: the console at the new site from its start', () => {
  let k = appendConsole(fresh, read({ next: 900, size: 900, text: 'at primary\n', cuts: 2 }));
  k = appendConsole(k, read({ site: 'recovery', offset: 900, next: 1000, size: 1000, text: 'mid\n' }));
  assert.equal(k.next, 0);
  assert.equal(k.site, 'recovery');
  assert.match(k.text, /\[the VM runs at recovery now: its console there, from the start\]\n$/);
  k = appendConsole(k, read({ site: 'recovery', offset: 0, next: 1000, size: 1000, text: 'boot at recovery\n' }));
  assert.match(k.text, /from the start\]\nboot at recovery\n$/);
});

test('a log that started again without a cut (moved aside at a VM start) is marked', () => {
  let k = appendConsole(fresh, read({ next: 500, size: 500, text: 'one\n' }));
  k = appendConsole(k, read({ offset: 0, next: 4, size: 4, text: 'two\n' }));
  assert.equal(k.text, 'one\n[the console log started again]\ntwo\n');
});

test('the page keeps at most `keep` characters, from a line start', () => {
  let k = appendConsole(fresh, read({ next: 10, size: 10, text: 'x'.repeat(50) + '\n' + 'y'.repeat(20) + '\n' }), 40);
  assert.equal(k.text, 'y'.repeat(20) + '\n');
  assert.equal(k.cut, true);
});
