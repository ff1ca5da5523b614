#include "report/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>
#include <tuple>

#include "common/progress.h"
#include "common/strings.h"
#include "report/html.h"
#include "report/page_assets.h"
#include "report/svg.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {

std::string fixed(double v, int decimals) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

// The folder names of `dirs`, with their parent folder where two names are the same.
std::vector<std::string> short_names(const std::vector<fs::path>& dirs) {
  std::vector<std::string> names;
  for (const fs::path& d : dirs) names.push_back(fs::path(d).lexically_normal().filename().string());
  for (size_t i = 0; i < dirs.size(); ++i)
    if (std::count(names.begin(), names.end(), names[i]) > 1 || names[i].empty()) {
      const fs::path full = fs::absolute(dirs[i]).lexically_normal();
      names[i] = (full.parent_path().filename() / full.filename()).string();
    }
  return names;
}

// Config values by dotted key ("optim.lr" -> "0.001").
void flatten(const json& j, const std::string& prefix, std::map<std::string, std::string>& out) {
  if (j.is_object() && !j.empty()) {
    for (const auto& [k, v] : j.items()) flatten(v, prefix.empty() ? k : prefix + "." + k, out);
  } else {
    out[prefix] = j.is_string() ? j.get<std::string>() : j.dump(-1, ' ', false, json::error_handler_t::replace);
  }
}

std::string summary_value(const json& s, const char* key) {
  if (!s.is_object() || !s.contains(key)) return "";
  const json& v = s[key];
  const std::string k = key;
  if (!v.is_number()) return v.is_string() ? v.get<std::string>() : v.dump(-1, ' ', false, json::error_handler_t::replace);
  const double d = v.get<double>();
  if (k == "seconds") return human_duration(d);
  if (k == "peak_memory_bytes") return human_bytes(d);
  if (k == "trainable_params" || k == "total_params") return human_count(d);
  if (k == "best_val_top1" || k == "val_top1") return percent(d);
  return fixed(d, d == std::floor(d) ? 0 : 4);
}

// A photo's name on the page: its path inside the evaluated folder.
std::string display_name(const std::string& path, const json& info) {
  const fs::path p(path);
  if (info.contains("data") && info["data"].is_string()) {
    const fs::path rel = p.lexically_relative(fs::absolute(info["data"].get<std::string>()).lexically_normal());
    if (!rel.empty() && *rel.begin() != "..") return rel.string();
  }
  return (p.parent_path().filename() / p.filename()).string();
}

// Thumbnails under a budget: wanted photos in priority order (lower first), each decoded once whatever section
// shows it.
class Thumbnails {
 public:
  void want(std::tuple<int, int64_t, int> priority, const std::string& path) { wanted_.push_back({priority, path}); }
  void make(const ReportOptions& options) {
    std::stable_sort(wanted_.begin(), wanted_.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<std::string> order;
    std::set<std::string> seen;
    for (const auto& [priority, path] : wanted_)
      if (static_cast<int>(order.size()) < options.max_thumbnails && seen.insert(path).second) order.push_back(path);
    ProgressBar bar("thumbnails", static_cast<int64_t>(order.size()), "photos");
    for (size_t i = 0; i < order.size(); ++i) {
      const auto uri = html::thumbnail(order[i], options.thumbnail_side);
      if (uri) index_[order[i]] = static_cast<int>(uris_.size()), uris_.push_back(*uri);
      else ++unreadable_;
      bar.update(static_cast<int64_t>(i + 1));
    }
    bar.finish();
  }
  int index(const std::string& path) const {
    const auto it = index_.find(path);
    return it == index_.end() ? -1 : it->second;
  }
  const std::vector<std::string>& uris() const { return uris_; }
  int unreadable() const { return unreadable_; }

 private:
  std::vector<std::pair<std::tuple<int, int64_t, int>, std::string>> wanted_;
  std::map<std::string, int> index_;
  std::vector<std::string> uris_;
  int unreadable_ = 0;
};

// Two evaluations of the same photos with the same classes: the first such pair, or {-1, -1}.
std::pair<int, int> comparable_pair(const std::vector<EvalRecord>& evals) {
  auto photos = [](const EvalRecord& e) {
    std::vector<std::string> paths;
    for (const auto& p : e.photos) paths.push_back(p.path);
    std::sort(paths.begin(), paths.end());
    return paths;
  };
  for (size_t a = 0; a < evals.size(); ++a)
    for (size_t b = a + 1; b < evals.size(); ++b)
      if (!evals[a].classes.empty() && evals[a].classes == evals[b].classes && photos(evals[a]) == photos(evals[b]))
        return {static_cast<int>(a), static_cast<int>(b)};
  return {-1, -1};
}

std::string runs_section(const std::vector<RunRecord>& runs, const std::vector<std::string>& names) {
  std::string out = "<section id=\"training\"><h2>Training</h2>";
  // Summary: one column per run.
  out += "<table class=\"summary\"><thead><tr><th></th>";
  for (const auto& n : names) out += "<th>" + html::escape(n) + "</th>";
  out += "</tr></thead><tbody>";
  const std::pair<const char*, const char*> rows[] = {
      {"method", "method"}, {"steps", "optimiser steps"}, {"epochs", "epochs"}, {"seconds", "time"},
      {"precision", "precision"}, {"trainable_params", "trainable parameters"}, {"total_params", "all parameters"},
      {"peak_memory_bytes", "peak memory"}, {"best_val_top1", "best validation top-1"}, {"best_epoch", "best epoch"}};
  for (const auto& [key, label] : rows) {
    std::string cells;
    bool any = false;
    for (const RunRecord& r : runs) {
      const std::string v = summary_value(r.summary, key);
      any |= !v.empty();
      cells += "<td data-run-summary=\"" + std::string(key) + "\">" + html::escape(v) + "</td>";
    }
    if (any) out += "<tr><th>" + std::string(label) + "</th>" + cells + "</tr>";
  }
  out += "</tbody></table>";
  for (size_t i = 0; i < runs.size(); ++i)
    if (runs[i].summary.is_null())
      out += "<p class=\"muted\">" + html::escape(names[i]) + ": no summary.json (the run has not finished)</p>";

  // Curves: every run on the same axes.
  auto chart = [&](Series RunRecord::*member, const ChartOptions& options, bool smoothed) {
    std::vector<Series> series;
    for (size_t i = 0; i < runs.size(); ++i) {
      Series s = runs[i].*member;
      if (runs.size() > 1) s.name = names[i] + ": " + s.name;
      series.push_back(s);
      if (smoothed && runs[i].smooth.y.size() >= 40) {
        Series m = runs[i].smooth;
        if (runs.size() > 1) m.name = names[i] + ": " + m.name;
        series.push_back(m);
      }
    }
    return svg::line_chart(series, options);
  };
  out += "<div class=\"charts\">";
  out += chart(&RunRecord::loss, {"training loss", "optimiser step", "cross-entropy", false, 560, 320}, true);
  out += chart(&RunRecord::lr, {"learning rate", "optimiser step", "learning rate", false, 560, 320}, false);
  out += chart(&RunRecord::val_top1, {"validation top-1 accuracy", "epoch", "top-1 (%)", false, 560, 320}, false);
  out += chart(&RunRecord::val_loss, {"validation loss", "epoch", "cross-entropy", false, 560, 320}, false);
  out += "</div>";

  // Settings: one column per run; rows that differ between runs are marked.
  std::vector<std::map<std::string, std::string>> settings(runs.size());
  std::set<std::string> keys;
  for (size_t i = 0; i < runs.size(); ++i) {
    if (!runs[i].config.is_null()) flatten(runs[i].config, "", settings[i]);
    for (const auto& [k, v] : settings[i]) keys.insert(k);
  }
  if (!keys.empty()) {
    out += "<details" + std::string(runs.size() > 1 ? " open" : "") + "><summary>Settings (config.json)</summary>";
    out += "<table class=\"settings\"><thead><tr><th>key</th>";
    for (const auto& n : names) out += "<th>" + html::escape(n) + "</th>";
    out += "</tr></thead><tbody>";
    for (const std::string& k : keys) {
      std::set<std::string> values;
      std::string cells;
      for (const auto& s : settings) {
        const auto it = s.find(k);
        const std::string v = it == s.end() ? "" : it->second;
        values.insert(v);
        cells += "<td>" + html::escape(v) + "</td>";
      }
      out += "<tr" + std::string(values.size() > 1 ? " class=\"differs\"" : "") + "><th>" + html::escape(k) + "</th>" +
             cells + "</tr>";
    }
    out += "</tbody></table></details>";
  }
  return out + "</section>";
}

// eval --retrieval: recall@K and mean rank in both directions, base and adapted.
std::string retrieval_table(const json& retrieval) {
  const auto text = [&](const char* key) {
    const json v = retrieval.value(key, json());
    return v.is_string() ? v.get<std::string>() : v.is_number_integer() ? std::to_string(v.get<int64_t>()) : "?";
  };
  std::string out = "<h3>Retrieval</h3><p class=\"muted\">" + html::escape(text("captions")) + ": " +
                    html::escape(text("images")) + " photos, " + html::escape(text("texts")) +
                    " captions; recall@K: the share of queries whose match ranks K or better.</p>"
                    "<table class=\"retrieval\"><thead><tr><th></th>";
  for (const char* direction : {"image &rarr; text", "text &rarr; image"}) {
    for (int64_t k : retrieval_recall_ks()) out += "<th>" + std::string(direction) + " R@" + std::to_string(k) + "</th>";
    out += "<th>" + std::string(direction) + " mean rank</th>";
  }
  out += "</tr></thead><tbody>";
  for (const char* variant : {"base", "adapted"}) {
    if (!retrieval.contains(variant) || !retrieval[variant].is_object()) continue;
    out += "<tr data-variant=\"" + std::string(variant) + "\"><th>" + variant + "</th>";
    for (const char* direction : {"image_to_text", "text_to_image"}) {
      json d = retrieval[variant].value(direction, json::object());
      if (!d.is_object()) d = json::object();
      for (int64_t k : retrieval_recall_ks()) {
        const json v = d.value("recall@" + std::to_string(k), json());
        out += "<td>" + (v.is_number() ? percent(v.get<double>(), 1) : std::string("n/a")) + "</td>";
      }
      const json rank = d.value("mean_rank", json());
      out += "<td>" + (rank.is_number() ? fixed(rank.get<double>(), 2) : std::string("n/a")) + "</td>";
    }
    out += "</tr>";
  }
  return out + "</tbody></table>";
}

std::string evaluation_section(const EvalRecord& e, const std::string& name, size_t k) {
  const ClassificationMetrics& m = e.metrics;
  const std::string id = std::to_string(k);
  auto info = [&](const char* key) {
    return e.info.contains(key) && e.info[key].is_string() ? e.info[key].get<std::string>() : std::string();
  };
  std::string out = "<section class=\"evaluation\" id=\"evaluation-" + id + "\"><h2>Evaluation: " + html::escape(name) + "</h2>";
  out += "<p class=\"muted\">model " + html::escape(info("model"));
  if (!info("adapter").empty()) out += ", adapter " + html::escape(info("adapter"));
  if (e.classes.empty()) {  // retrieval alone
    out += "</p>";
    if (e.info["retrieval"].is_object()) out += retrieval_table(e.info["retrieval"]);
    return out + "</section>";
  }
  out += ", photos " + html::escape(info("data")) + "</p>";
  int64_t errors = 0;
  for (const auto& p : e.photos) errors += p.truth != p.predicted;
  out += "<table class=\"numbers\"><tr>";
  std::vector<std::tuple<std::string, std::string, std::string>> numbers = {
      {"top1", "top-1", percent(m.top1)}, {"top5", "top-5", m.top5 >= 0 ? percent(m.top5) : "n/a"},
      {"macro_f1", "macro F1", percent(m.macro_f1)}, {"loss", "loss", fixed(m.loss, 4)},
      {"ece", "calibration error (ECE)", m.calibration.empty() ? "n/a" : percent(m.ece)},
      {"count", "photos", std::to_string(m.count)}, {"errors", "misclassified", std::to_string(errors)}};
  for (const auto& [key, label, value] : numbers)
    out += "<td><div class=\"value\" data-metric=\"" + key + "\">" + value + "</div><div class=\"label\">" + label + "</div></td>";
  out += "</tr></table>";
  if (e.info.contains("retrieval") && e.info["retrieval"].is_object()) out += retrieval_table(e.info["retrieval"]);

  // Per-class table.
  out += "<div class=\"columns\"><div><h3>Per class</h3><table class=\"per-class\"><thead><tr><th>class</th><th>precision</th>"
         "<th>recall</th><th>F1</th><th>photos</th></tr></thead><tbody>";
  for (size_t c = 0; c < e.classes.size(); ++c) {
    const ClassMetrics& pc = m.per_class[c];
    out += "<tr data-class=\"" + std::to_string(c) + "\"><th>" + html::escape(e.classes[c]) + "</th><td data-field=\"precision\">" +
           percent(pc.precision, 1) + "</td><td data-field=\"recall\">" + percent(pc.recall, 1) +
           "</td><td data-field=\"f1\">" + percent(pc.f1, 1) + "</td><td data-field=\"support\">" +
           std::to_string(pc.support) + "</td></tr>";
  }
  out += "<tr class=\"average\"><th>macro average</th><td>" + percent(m.macro_precision, 1) + "</td><td>" +
         percent(m.macro_recall, 1) + "</td><td>" + percent(m.macro_f1, 1) + "</td><td>" + std::to_string(m.count) +
         "</td></tr></tbody></table></div>";

  // Calibration.
  out += "<div><h3>Calibration</h3>";
  if (m.calibration.empty()) {
    out += "<p class=\"muted\">not in this metrics.json (evaluate again to add it)</p>";
  } else {
    out += svg::reliability_diagram(m.calibration);
    out += "<p class=\"muted\">Bars: accuracy of the photos whose top probability falls in each bin; red: the gap to "
           "their mean confidence; diagonal: perfect calibration. ECE " + percent(m.ece) + ".</p>";
  }
  out += "</div></div>";

  // Confusion matrix: rows true, columns predicted, shaded by the row's fraction; a click shows the cell's photos.
  out += "<h3>Confusion matrix</h3><p class=\"muted\">Rows: true class; columns: predicted. Click a cell for its photos.</p>";
  out += "<div class=\"scroll\"><table class=\"confusion\" id=\"confusion-" + id + "\"><thead><tr><th>true \\ predicted</th>";
  for (const auto& c : e.classes) out += "<th class=\"predicted\">" + html::escape(c) + "</th>";
  out += "</tr></thead><tbody>";
  for (size_t t = 0; t < e.classes.size(); ++t) {
    int64_t row_total = 0;
    for (int64_t v : m.confusion[t]) row_total += v;
    out += "<tr><th>" + html::escape(e.classes[t]) + "</th>";
    for (size_t p = 0; p < e.classes.size(); ++p) {
      const int64_t v = m.confusion[t][p];
      const double share = row_total ? static_cast<double>(v) / row_total : 0;
      out += "<td class=\"cell" + std::string(t == p ? " diagonal" : "") + (share > 0.55 ? " dark" : "") +
             "\" tabindex=\"0\" data-true=\"" + std::to_string(t) + "\" data-pred=\"" + std::to_string(p) +
             "\" style=\"background:rgba(31,119,180," + fixed(share, 3) + ")\" title=\"" +
             html::escape(e.classes[t] + " as " + e.classes[p]) + ": " + std::to_string(v) + "\">" + std::to_string(v) + "</td>";
    }
    out += "</tr>";
  }
  out += "</tbody></table></div>";
  out += "<h4 id=\"cell-title-" + id + "\" class=\"muted\">no cell chosen</h4><div class=\"grid\" id=\"cell-photos-" + id + "\"></div>";
  out += "<h3>Misclassified photos, most confident first</h3><div class=\"grid\" id=\"errors-" + id + "\"></div>";
  return out + "</section>";
}

std::string comparison_section(const std::vector<EvalRecord>& evals, std::pair<int, int> pair,
                               const std::vector<std::string>& names, json& data) {
  const EvalRecord &a = evals[pair.first], &b = evals[pair.second];
  std::map<std::string, size_t> in_b;
  for (size_t i = 0; i < b.photos.size(); ++i) in_b[b.photos[i].path] = i;
  json a_only = json::array(), b_only = json::array();
  int64_t both_right = 0, both_wrong = 0;
  for (size_t i = 0; i < a.photos.size(); ++i) {
    const size_t j = in_b.at(a.photos[i].path);
    const bool ra = a.photos[i].truth == a.photos[i].predicted, rb = b.photos[j].truth == b.photos[j].predicted;
    if (ra && !rb) a_only.push_back({i, j});
    if (rb && !ra) b_only.push_back({i, j});
    both_right += ra && rb, both_wrong += !ra && !rb;
  }
  const std::string na = html::escape(names[pair.first]), nb = html::escape(names[pair.second]);
  data["comparison"] = {{"a", pair.first}, {"b", pair.second}, {"names", {names[pair.first], names[pair.second]}},
                        {"a_only", a_only}, {"b_only", b_only}};
  std::string out = "<section id=\"comparison\"><h2>Comparison: " + na + " and " + nb + "</h2>";
  out += "<p>Same " + std::to_string(a.photos.size()) + " photos. Top-1 " + na + " <b data-compare=\"a-top1\">" +
         percent(a.metrics.top1) + "</b>, " + nb + " <b data-compare=\"b-top1\">" + percent(b.metrics.top1) +
         "</b>. Both right: " + std::to_string(both_right) + "; both wrong: " + std::to_string(both_wrong) + "; only " +
         na + " right: <b data-compare=\"a-only\">" + std::to_string(a_only.size()) + "</b>; only " + nb +
         " right: <b data-compare=\"b-only\">" + std::to_string(b_only.size()) + "</b>.</p>";
  out += "<table class=\"per-class\"><thead><tr><th>class</th><th>accuracy " + na + "</th><th>accuracy " + nb +
         "</th><th>change</th><th>photos</th></tr></thead><tbody>";
  for (size_t c = 0; c < a.classes.size(); ++c) {
    const double ra = a.metrics.per_class[c].recall, rb = b.metrics.per_class[c].recall;
    const char* trend = rb > ra ? "better" : rb < ra ? "worse" : "same";
    out += "<tr><th>" + html::escape(a.classes[c]) + "</th><td>" + percent(ra, 1) + "</td><td>" + percent(rb, 1) +
           "</td><td class=\"" + trend + "\">" + (rb >= ra ? "+" : "") + fixed(100 * (rb - ra), 1) + "</td><td>" +
           std::to_string(a.metrics.per_class[c].support) + "</td></tr>";
  }
  out += "</tbody></table>";
  out += "<h3>Right in " + na + ", wrong in " + nb + "</h3><div class=\"grid\" id=\"a-only\"></div>";
  out += "<h3>Right in " + nb + ", wrong in " + na + "</h3><div class=\"grid\" id=\"b-only\"></div>";
  return out + "</section>";
}

}  // namespace

std::string render_report(const std::vector<RunRecord>& runs, const std::vector<EvalRecord>& evals,
                          const ReportOptions& options) {
  std::vector<fs::path> run_dirs, eval_dirs;
  for (const auto& r : runs) run_dirs.push_back(r.dir);
  for (const auto& e : evals) eval_dirs.push_back(e.dir);
  const std::vector<std::string> run_names = short_names(run_dirs), eval_names = short_names(eval_dirs);
  const std::pair<int, int> pair = comparable_pair(evals);

  // Thumbnails: the comparison's disagreements, then each evaluation's errors (most confident first), then the rest.
  Thumbnails thumbnails;
  if (pair.first >= 0) {
    const EvalRecord &a = evals[pair.first], &b = evals[pair.second];
    std::map<std::string, bool> right_in_b;
    for (const auto& p : b.photos) right_in_b[p.path] = p.truth == p.predicted;
    for (size_t i = 0; i < a.photos.size(); ++i)
      if ((a.photos[i].truth == a.photos[i].predicted) != right_in_b[a.photos[i].path])
        thumbnails.want({0, static_cast<int64_t>(i), 0}, a.photos[i].path);
  }
  for (size_t k = 0; k < evals.size(); ++k) {
    std::vector<const EvaluatedPhoto*> errors;
    for (const auto& p : evals[k].photos)
      if (p.truth != p.predicted) errors.push_back(&p);
    std::stable_sort(errors.begin(), errors.end(), [](auto* x, auto* y) { return x->confidence > y->confidence; });
    for (size_t r = 0; r < errors.size(); ++r) thumbnails.want({1, static_cast<int64_t>(r), static_cast<int>(k)}, errors[r]->path);
    for (size_t i = 0; i < evals[k].photos.size(); ++i)
      thumbnails.want({2, static_cast<int64_t>(i), static_cast<int>(k)}, evals[k].photos[i].path);
  }
  thumbnails.make(options);

  json data = {{"maxTiles", options.max_tiles}, {"comparison", nullptr}};
  json eval_data = json::array();
  std::set<std::string> evaluated;  // photos, each once however many evaluations scored it
  for (const EvalRecord& e : evals) {
    json photos = json::array();
    for (const auto& p : e.photos)
      photos.push_back({display_name(p.path, e.info), p.truth, p.predicted, std::round(p.confidence * 1e4) / 1e4,
                        thumbnails.index(p.path)});
    for (const auto& p : e.photos) evaluated.insert(p.path);
    eval_data.push_back({{"dir", fs::absolute(e.dir).lexically_normal().string()}, {"classes", e.classes}, {"photos", photos}});
  }
  data["evals"] = eval_data;

  std::string body;
  if (!runs.empty()) body += runs_section(runs, run_names);
  for (size_t k = 0; k < evals.size(); ++k) body += evaluation_section(evals[k], eval_names[k], k);
  if (evals.empty())
    body += "<p class=\"muted\" id=\"no-evaluation\">Per-class numbers, the photos and a photo-by-photo comparison "
            "come from evaluations on held-out photos: <code>loratune eval --model MODEL --adapter RUN/best --data "
            "PHOTOS --output EVAL</code>, then <code>loratune report RUN --eval EVAL</code>.</p>";
  if (pair.first >= 0) body += comparison_section(evals, pair, eval_names, data);
  else if (evals.size() > 1)
    body += "<p class=\"muted\">The evaluations are of different photos or classes: no photo-by-photo comparison.</p>";
  data["thumbs"] = thumbnails.uris();

  std::vector<std::string> titles;
  if (!run_names.empty()) titles.push_back((runs.size() > 1 ? "runs " : "run ") + join(run_names, ", "));
  if (!eval_names.empty()) titles.push_back((evals.size() > 1 ? "evaluations " : "evaluation ") + join(eval_names, ", "));
  std::string footer = std::to_string(thumbnails.uris().size()) + " of " + std::to_string(evaluated.size()) +
                       " evaluated photos embedded as thumbnails (at most " + std::to_string(options.max_thumbnails) +
                       ", errors first)";
  if (thumbnails.unreadable()) footer += "; " + std::to_string(thumbnails.unreadable()) + " could not be read any more";
  return std::string("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">") +
         "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">" +
         "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">" +
         "<title>loratune report: " + html::escape(join(titles, "; ")) + "</title><style>" + report_assets::kStyle +
         "</style></head><body><header><h1>loratune report</h1><p class=\"muted\">" + html::escape(join(titles, "; ")) +
         " &middot; loratune " + LORATUNE_VERSION + "</p></header><noscript><p>The photo grids need JavaScript; the "
         "numbers and charts are shown without it.</p></noscript>" + body + "<footer class=\"muted\">" +
         html::escape(footer) + "</footer><script type=\"application/json\" id=\"report-data\">" + html::script_json(data) +
         "</script><script>" + report_assets::kScript + "</script></body></html>\n";
}

}  // namespace loratune
