//! Which cells of a CSV row are features, which is the label and which are left out: learnt
//! from the training file's first row and the `data.*` keys, then mapped, by name, onto the
//! columns of every file read later (a test file, rows to predict).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::reader::Rows;
use crate::error::{Error, Result};
use crate::settings::{Column, DataSettings, Header};

/// The columns of the training file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    /// The header's names in file order; `None` for a file without a header.
    pub names: Option<Vec<String>>,
    /// Cells in a row.
    pub cells: usize,
    /// The label's cell, from 0.
    pub label: usize,
    /// The cells left out, from 0, in file order.
    pub ignored: Vec<usize>,
}

/// Whether the rows of a file must hold a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelColumn {
    Required,
    /// Rows to predict: with their label the predictions are scored, without it they are not.
    Optional,
}

/// Where the cells of a later file go: `features[k]` is the cell of the model's feature `k`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Mapping {
    pub cells: usize,
    pub features: Vec<usize>,
    pub label: Option<usize>,
}

impl Layout {
    /// Learns the columns from the training file's first row; returns whether that row is a
    /// header (and holds no sample).
    pub(super) fn learn(
        first: &::csv::StringRecord,
        data: &DataSettings,
        rows: &Rows,
    ) -> Result<(Self, bool)> {
        let cells = first.len();
        if cells < 2 {
            return Err(rows.error("rows need at least one feature and a label"));
        }
        let header = is_header(first, data, rows)?;
        let names: Option<Vec<String>> = header.then(|| first.iter().map(String::from).collect());
        if let Some(names) = &names {
            index_names(names, rows)?;
        }
        let find = |key: &str, column: &Column| resolve(key, column, names.as_deref(), cells, rows);
        let label = match &data.label {
            Some(column) => find("data.label", column)?,
            None => cells - 1,
        };
        let mut ignored = Vec::with_capacity(data.ignore.len());
        for column in &data.ignore {
            let cell = find("data.ignore", column)?;
            if cell == label {
                return Err(key_error(
                    rows,
                    "data.ignore",
                    format!(
                        "names {}, the label column",
                        describe(names.as_deref(), cell)
                    ),
                ));
            }
            if !ignored.contains(&cell) {
                ignored.push(cell);
            }
        }
        ignored.sort_unstable();
        if ignored.len() + 1 >= cells {
            return Err(key_error(rows, "data.ignore", "leaves no feature column"));
        }
        let layout = Layout {
            names,
            cells,
            label,
            ignored,
        };
        Ok((layout, header))
    }

    /// The cells of the features, in file order: the model's order.
    pub fn feature_cells(&self) -> Vec<usize> {
        (0..self.cells)
            .filter(|c| *c != self.label && !self.ignored.contains(c))
            .collect()
    }

    /// The features' names: their header names, or `column N` without a header.
    pub fn feature_names(&self) -> Vec<String> {
        let cells = self.feature_cells();
        match &self.names {
            Some(names) => cells.iter().map(|&c| names[c].clone()).collect(),
            None => cells.iter().map(|c| format!("column {}", c + 1)).collect(),
        }
    }

    /// The label column, as an error message names it.
    pub fn label_name(&self) -> String {
        describe(self.names.as_deref(), self.label)
    }

    /// The training file's mapping onto itself.
    pub(super) fn own_mapping(&self) -> Mapping {
        Mapping {
            cells: self.cells,
            features: self.feature_cells(),
            label: Some(self.label),
        }
    }

    /// Maps the columns of a later file, whose first row is `first`, onto these; returns
    /// whether that row is a header. With names, every column is found by its name, in any
    /// order, and a column the model does not know is refused by name; without, the rows hold
    /// the training file's cells, with or without the label.
    pub(super) fn map(
        &self,
        first: &::csv::StringRecord,
        label: LabelColumn,
        rows: &Rows,
    ) -> Result<(Mapping, bool)> {
        match &self.names {
            Some(names) => self
                .map_by_name(names, first, label, rows)
                .map(|m| (m, true)),
            None => self
                .map_by_position(first.len(), label, rows)
                .map(|m| (m, false)),
        }
    }

    fn map_by_name(
        &self,
        names: &[String],
        first: &::csv::StringRecord,
        label: LabelColumn,
        rows: &Rows,
    ) -> Result<Mapping> {
        if first.iter().all(|cell| cell.parse::<f32>().is_ok()) {
            return Err(rows.error(format!(
                "holds numbers only, where the header should name the columns: the model's \
                 features are found by name ({})",
                listing(&self.feature_names())
            )));
        }
        let header: Vec<String> = first.iter().map(String::from).collect();
        index_names(&header, rows)?;
        let trained_cells = index_names(names, rows)?;
        let features = self.feature_cells();
        // The model's feature number of each training cell.
        let feature_of: HashMap<usize, usize> =
            features.iter().enumerate().map(|(k, &c)| (c, k)).collect();
        let mut found = vec![None; features.len()];
        let mut label_cell = None;
        for (cell, name) in header.iter().enumerate() {
            let trained = trained_cells.get(name.as_str()).copied();
            if trained == Some(self.label) {
                label_cell = Some(cell);
            } else if let Some(&k) = trained.and_then(|t| feature_of.get(&t)) {
                found[k] = Some(cell);
            } else if trained.is_none() {
                return Err(rows.error(format!(
                    "column '{name}' is not one the model was trained on (its columns: {})",
                    listing(names)
                )));
            }
        }
        let missing: Vec<String> = (0..features.len())
            .filter(|&k| found[k].is_none())
            .map(|k| names[features[k]].clone())
            .collect();
        if !missing.is_empty() {
            return Err(rows.error(format!(
                "the header lacks the model's feature column{} {}",
                if missing.len() == 1 { "" } else { "s" },
                listing(&missing)
            )));
        }
        if label == LabelColumn::Required && label_cell.is_none() {
            return Err(rows.error(format!(
                "the header lacks the label column '{}'",
                names[self.label]
            )));
        }
        Ok(Mapping {
            cells: header.len(),
            features: found.into_iter().flatten().collect(),
            label: label_cell,
        })
    }

    fn map_by_position(&self, cells: usize, label: LabelColumn, rows: &Rows) -> Result<Mapping> {
        if cells == self.cells {
            return Ok(self.own_mapping());
        }
        if cells + 1 == self.cells && label == LabelColumn::Optional {
            // The label's cell removed: the cells after it move one to the left.
            let shift = |c: usize| if c > self.label { c - 1 } else { c };
            return Ok(Mapping {
                cells,
                features: self.feature_cells().into_iter().map(shift).collect(),
                label: None,
            });
        }
        Err(rows.error(format!(
            "{cells} cells, but the model's rows had {}{}",
            self.cells,
            match label {
                LabelColumn::Optional => format!(" ({} without the label)", self.cells - 1),
                LabelColumn::Required => String::new(),
            }
        )))
    }
}

/// Whether the training file's first row is a header, as `data.header` says.
fn is_header(first: &::csv::StringRecord, data: &DataSettings, rows: &Rows) -> Result<bool> {
    let named = matches!(data.label, Some(Column::Name(_)))
        || data.ignore.iter().any(|c| matches!(c, Column::Name(_)));
    match data.header {
        Header::Present => Ok(true),
        Header::Absent if named => Err(key_error(
            rows,
            if matches!(data.label, Some(Column::Name(_))) {
                "data.label"
            } else {
                "data.ignore"
            },
            "names a column, but data.header = false: give its number instead",
        )),
        Header::Absent => Ok(false),
        Header::Auto if named => Ok(true),
        Header::Auto => {
            let label = match &data.label {
                Some(Column::Number(n)) => n - 1,
                _ => first.len() - 1,
            };
            Ok(first
                .iter()
                .enumerate()
                .any(|(cell, text)| cell != label && text.parse::<f32>().is_err()))
        }
    }
}

/// The cell of `column`: by name in the header, or by number (a name of digits that the header
/// does not hold is read as a number, as an environment variable gives it).
fn resolve(
    key: &str,
    column: &Column,
    names: Option<&[String]>,
    cells: usize,
    rows: &Rows,
) -> Result<usize> {
    let number = match column {
        Column::Number(n) => Some(*n),
        Column::Name(name) => {
            if let Some(cell) = names.and_then(|names| names.iter().position(|n| n == name)) {
                return Ok(cell);
            }
            match name.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Some(n),
                _ => None,
            }
        }
    };
    match (number, names) {
        (Some(n), _) if n <= cells => Ok(n - 1),
        (Some(n), _) => Err(key_error(
            rows,
            key,
            format!("column {n}, but rows have {cells} columns"),
        )),
        (None, Some(names)) => Err(key_error(
            rows,
            key,
            format!(
                "{column} is not a column: the header holds {}",
                listing(names)
            ),
        )),
        (None, None) => Err(key_error(
            rows,
            key,
            format!("names {column}, but the file has no header: give its number instead"),
        )),
    }
}

/// Refuses a header that names two columns alike: neither could be found by its name. Returns
/// each name's column, for finding columns by name (a row of 8 MiB may hold a million).
fn index_names<'a>(names: &'a [String], rows: &Rows) -> Result<HashMap<&'a str, usize>> {
    let mut index = HashMap::with_capacity(names.len());
    for (cell, name) in names.iter().enumerate() {
        if let Some(earlier) = index.insert(name.as_str(), cell) {
            return Err(rows.error(format!(
                "columns {} and {} are both named '{name}'",
                earlier + 1,
                cell + 1
            )));
        }
    }
    Ok(index)
}

/// A cell as an error message names it: `column 3 (mean_area)`, or `column 3`.
pub(super) fn describe(names: Option<&[String]>, cell: usize) -> String {
    match names {
        Some(names) => format!("column {} ({})", cell + 1, names[cell]),
        None => format!("column {}", cell + 1),
    }
}

/// An error of a `data.*` key about the file of `rows`.
fn key_error(rows: &Rows, key: &str, message: impl std::fmt::Display) -> Error {
    Error::data(rows.path(), format!("{key}: {message}"))
}

/// Names for an error message: all of them up to 12, else the first 12 and how many more.
pub(super) fn listing(names: &[String]) -> String {
    const SHOWN: usize = 12;
    let quoted: Vec<String> = names.iter().take(SHOWN).map(|n| format!("'{n}'")).collect();
    match names.len().saturating_sub(SHOWN) {
        0 => quoted.join(", "),
        more => format!("{} and {more} more", quoted.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(cells: &[&str]) -> ::csv::StringRecord {
        ::csv::StringRecord::from(cells.to_vec())
    }

    fn settings(keys: &str) -> DataSettings {
        toml::from_str(&format!(
            "format = \"csv\"\ntrain_csv = \"x.csv\"\ntest_fraction = 0.2\n{keys}"
        ))
        .unwrap()
    }

    /// `Rows` over an empty file, for the errors' file name.
    fn rows() -> (tempfile::NamedTempFile, Rows) {
        let file = tempfile::NamedTempFile::new().unwrap();
        let rows = Rows::open(file.path(), 1 << 20, 1 << 20).unwrap();
        (file, rows)
    }

    fn learn(first: &[&str], keys: &str) -> Result<(Layout, bool)> {
        let (_file, rows) = rows();
        Layout::learn(&record(first), &settings(keys), &rows)
    }

    #[test]
    fn auto_finds_a_header_by_a_cell_that_is_not_a_number_outside_the_label() {
        assert!(!learn(&["1", "2.5", "cat"], "").unwrap().1);
        assert!(learn(&["1", "x", "cat"], "").unwrap().1);
        // The label's own cell does not count: text labels are no header.
        assert!(!learn(&["cat", "1", "2"], "label = 1").unwrap().1);
        assert!(learn(&["kind", "a", "b"], "label = 1").unwrap().1);
        // A label named makes the first row a header; `false` forbids naming one.
        assert!(
            learn(&["1", "2", "3"], "label = \"3\"\nheader = true")
                .unwrap()
                .1
        );
        let err = learn(&["1", "2"], "label = \"y\"\nheader = false").unwrap_err();
        assert!(
            err.to_string()
                .contains("data.label: names a column, but data.header = false")
        );
    }

    #[test]
    fn columns_resolve_by_name_or_number_and_leave_features_in_file_order() {
        let (layout, _) = learn(&["id", "y", "a", "b"], "label = \"y\"\nignore = [1]").unwrap();
        assert_eq!((layout.label, layout.ignored.clone()), (1, vec![0]));
        assert_eq!(layout.feature_names(), ["a", "b"]);
        // A name of digits that no column has is a number, as an environment variable gives it.
        let (layout, _) = learn(&["id", "y", "a", "b"], "label = \"2\"").unwrap();
        assert_eq!(layout.label, 1);
        let (layout, header) = learn(&["4", "5", "6"], "").unwrap();
        assert!(!header);
        assert_eq!(layout.feature_names(), ["column 1", "column 2"]);
        let err = learn(&["a", "b"], "label = 3").unwrap_err().to_string();
        assert!(
            err.ends_with("data.label: column 3, but rows have 2 columns"),
            "{err}"
        );
        let err = learn(&["a", "b"], "ignore = [1]").unwrap_err().to_string();
        assert!(
            err.ends_with("data.ignore: leaves no feature column"),
            "{err}"
        );
    }

    #[test]
    fn later_files_map_by_name_in_any_order_or_by_position_without_a_header() {
        let (_file, rows) = rows();
        let (named, _) = learn(&["y", "a", "b", "id"], "label = \"y\"\nignore = [\"id\"]").unwrap();
        let (mapping, header) = named
            .map(&record(&["b", "id", "a"]), LabelColumn::Optional, &rows)
            .unwrap();
        assert!(header);
        assert_eq!((mapping.features, mapping.label), (vec![2, 0], None));
        let err = named
            .map(&record(&["b", "a"]), LabelColumn::Required, &rows)
            .unwrap_err();
        assert!(
            err.to_string()
                .ends_with("line 0: the header lacks the label column 'y'")
        );
        let err = named
            .map(&record(&["1", "2", "3"]), LabelColumn::Optional, &rows)
            .unwrap_err();
        assert!(
            err.to_string().ends_with(
                "line 0: holds numbers only, where the header should name the columns: the \
                 model's features are found by name ('a', 'b')"
            ),
            "{err}"
        );
        let (plain, _) = learn(&["1", "2", "3"], "label = 2").unwrap();
        let (mapping, header) = plain
            .map(&record(&["7", "9"]), LabelColumn::Optional, &rows)
            .unwrap();
        assert!(!header);
        assert_eq!((mapping.features, mapping.label), (vec![0, 1], None));
        let err = plain
            .map(&record(&["7", "9"]), LabelColumn::Required, &rows)
            .unwrap_err();
        assert!(
            err.to_string()
                .ends_with("2 cells, but the model's rows had 3"),
            "{err}"
        );
    }

    #[test]
    fn long_listings_are_cut() {
        let names: Vec<String> = (0..14).map(|i| format!("c{i}")).collect();
        let text = listing(&names);
        assert!(text.starts_with("'c0', 'c1'"), "{text}");
        assert!(text.ends_with("'c11' and 2 more"), "{text}");
    }
}
