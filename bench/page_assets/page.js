// saliency-bench leaderboard page (bench/page.py inlines this file): sorting, filtering, switching views.
function sortBy(table, th) {
  const col = th.cellIndex, body = table.tBodies[0];
  const ascending = th.dataset.order !== 'asc';
  for (const other of th.parentElement.cells) { delete other.dataset.order; }
  th.dataset.order = ascending ? 'asc' : 'desc';
  const numeric = Array.from(body.rows).some(row => row.cells[col] && row.cells[col].dataset.value !== undefined);
  const key = row => numeric ? parseFloat(row.cells[col].dataset.value) : row.cells[col].textContent;
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    if (numeric && isNaN(x) !== isNaN(y)) { return isNaN(x) ? 1 : -1; }   // undefined values last
    if (numeric && isNaN(x)) { return 0; }
    const c = numeric ? x - y : x.localeCompare(y);
    return ascending ? c : -c;
  });
  rows.forEach(row => body.appendChild(row));
}
for (const table of document.querySelectorAll('table')) {            // every table sorts
  const heads = table.tHead.rows[table.tHead.rows.length - 1];   // the row under the families
  for (const th of heads.cells) {
    th.addEventListener('click', event => { if (!event.target.closest('a')) { sortBy(table, th); } });
  }
}
function showView(index) {
  for (const tab of document.querySelectorAll('.tab')) {
    tab.setAttribute('aria-selected', tab.dataset.view === index ? 'true' : 'false');
  }
  for (const view of document.querySelectorAll('section.view')) { view.hidden = view.dataset.view !== index; }
}
for (const tab of document.querySelectorAll('.tab')) { tab.addEventListener('click', () => showView(tab.dataset.view)); }
if (document.querySelector('.tab')) { showView(document.querySelector('.tab').dataset.view); }
function filter() {
  const q = document.getElementById('filter').value.trim().toLowerCase();
  for (const row of document.querySelectorAll('tr[data-method]')) {
    row.hidden = q !== '' && !row.dataset.method.toLowerCase().includes(q);
  }
}
document.getElementById('filter').addEventListener('input', filter);
const all = document.getElementById('all-scores');
function allScores() {                     // every score, or the headline score of each metric only
  document.body.classList.toggle('all-scores', all.checked);
  for (const th of document.querySelectorAll('th[data-span]')) {
    const [headline, every] = th.dataset.span.split(' ');
    th.colSpan = parseInt(all.checked ? every : headline);
  }
}
if (all) { all.addEventListener('change', allScores); }
function openTarget() {                   // a link to a folded section (#cost, #provenance) unfolds it
  const target = document.getElementById(decodeURIComponent(location.hash.slice(1)));
  if (target && target.tagName === 'DETAILS') { target.open = true; }
}
window.addEventListener('hashchange', openTarget);
openTarget();
