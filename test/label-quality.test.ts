import { test } from "node:test";
import assert from "node:assert/strict";
import { formatReport } from "../src/cli/evaluate.js";
import { liveLabels } from "../src/core/label.js";
import { explicitAgreement, formatExplicit, ratingsFromEvents } from "../src/eval/explicit.js";
import { simulate } from "../src/sim/simulate.js";
import { runChain, scoreChain, scoreHumanUsers } from "./support/label-chain.js";

/*
 * Simulated traffic through the whole chain in memory (enrich → dedupe → bot-score → sessionize →
 * reformulation → label-derive, the real operators from the registry), scored against the
 * simulator's hidden truth. Floors are deliberately below what the default rules reach, so the
 * test fails on a regression, not on a seed's noise; the report is printed for the record.
 * Two seeds, so the rules are not fitted to one.
 */

for (const seed of [7, 11]) {
  test(`simulated traffic (seed ${seed}, 300 users, 30 % bots) → labels and features of sane quality`, async (t) => {
    const sim = simulate({ seed, users: 300, durationMs: 2 * 3600_000 });
    const r = await runChain(sim.events, { partitions: 4 });
    const report = scoreChain(r, sim.truth);
    for (const line of formatReport(report).split("\n")) t.diagnostic(line);

    // Contract: every label validates, none is duplicated, none carries a raw user id.
    assert.deepEqual(r.invalid, []);
    assert.equal(report.labels.duplicates, 0);
    assert.equal(report.labels.raw_user_ids, 0);
    assert.equal(report.labels.unknown_response, 0);
    const perRevision = new Set(r.labelEmits.map(([, l]) => `${l.label_id}:${l.revision}`));
    assert.equal(perRevision.size, r.labelEmits.length, "one message per label_id and revision");
    assert.ok(report.labels.by_kind.response > 500 && report.labels.by_kind.preference > 20 && report.labels.by_kind.session > 100, JSON.stringify(report.labels.by_kind));

    // Probation holds a bot's early labels and the flag drops them; what was published before the
    // flag (a bot flagged only after min_events events or after its first session closed) is
    // retracted. The final view keeps labels only of the scripts bot-score never flags.
    const flaggedLive = liveLabels(r.labels).filter((l) => r.botUsers.has(l.user));
    assert.deepEqual(flaggedLive.map((l) => l.label_id), [], "no live label of a flagged user");
    assert.ok(report.delivery.published_then_retracted_bots > 0 && report.delivery.published_then_retracted === report.delivery.published_then_retracted_bots, JSON.stringify(report.delivery));
    assert.ok(report.labels.from_bots / report.labels.live < 0.05, `labels from bot users: ${report.labels.from_bots} of ${report.labels.live}`);

    // Quality floors on everything that reached label-derive.
    assert.ok(report.positive.precision! >= 0.7, `positive precision ${report.positive.precision}`);
    assert.ok(report.score.auc! >= 0.75, `AUC ${report.score.auc}`);
    assert.ok(report.coverage! >= 0.4, `coverage ${report.coverage}`);
    assert.ok(report.negative.precision! >= 0.6, `negative precision ${report.negative.precision}`);
    assert.ok(report.preference.accuracy! > 0.5, `preference accuracy ${report.preference.accuracy}`);
    // Inverse propensity leaves less position correlation in the score than the ranker put into quality.
    assert.ok(Math.abs(report.score.position_spearman!) < Math.abs(report.score.quality_position_spearman!), "position bias left in the score");
    assert.ok(report.baselines !== null && report.baselines.auc_gain !== null);

    // The same on human traffic only: what label-derive makes of what bot-score lets through as human.
    const human = scoreHumanUsers(r, sim.truth);
    t.diagnostic(`human users only: positive precision ${human.positive.precision?.toFixed(3)}, negative precision ${human.negative.precision?.toFixed(3)}, coverage ${human.coverage?.toFixed(3)}, AUC ${human.score.auc?.toFixed(3)}`);
    assert.ok(human.positive.precision! >= 0.8, `human positive precision ${human.positive.precision}`);

    // Calibration (tacit evaluate --explicit): the held-out explicit ratings judge the labels as the
    // hidden truth does — each agreement figure with at least 10 labels sits within the Wilson
    // interval of the truth's figure for the same labels (raters err on 4 % of ratings, so the
    // figures need not be equal).
    const agreement = explicitAgreement(r.labels, ratingsFromEvents(sim.events.join("\n")), sim.truth);
    for (const line of formatExplicit(agreement).split("\n")) t.diagnostic(line);
    const judged = agreement.rows.filter((x) => x.explicit.n >= 10);
    assert.ok(judged.some((x) => x.rule === "all"), `rows with n ≥ 10: ${judged.length}`);
    for (const row of judged) {
      const [lo, hi] = row.truth!.ci!;
      assert.equal(row.truth!.n, row.explicit.n, "the same labels on both sides");
      assert.ok(row.explicit.precision! >= lo && row.explicit.precision! <= hi, `${row.label} ${row.rule}: explicit ${row.explicit.precision}, truth ${row.truth!.precision} [${lo}, ${hi}] (n ${row.explicit.n})`);
    }
  });
}

