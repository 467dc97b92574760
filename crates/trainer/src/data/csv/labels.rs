//! A CSV file's labels: whole numbers, which are class ids as they are, or text, which names
//! classes (ids in sorted order of the names).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::settings::{DataSettings, MAX_CLASSES};

/// The classes of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Classes {
    /// Labels are the class ids `0..count`.
    Numbers(usize),
    /// Labels are these names, sorted: a name's class id is its place.
    Names(Vec<String>),
}

impl Classes {
    pub fn count(&self) -> usize {
        match self {
            Classes::Numbers(count) => *count,
            Classes::Names(names) => names.len(),
        }
    }

    /// The name of every class: its label as written in the file.
    pub fn names(&self) -> Vec<String> {
        match self {
            Classes::Numbers(count) => (0..*count).map(|c| c.to_string()).collect(),
            Classes::Names(names) => names.clone(),
        }
    }

    /// The class of a label cell of a file read after training.
    pub(super) fn class_of(&self, text: &str) -> Result<u8, String> {
        if text.is_empty() {
            return Err("the label is empty".into());
        }
        match self {
            Classes::Numbers(count) => number_label(text, *count),
            Classes::Names(names) => names
                .binary_search_by(|n| n.as_str().cmp(text))
                .map(|class| class as u8)
                .map_err(|_| {
                    format!(
                        "label '{text}' is not a class the model was trained on ({})",
                        super::columns::listing(names)
                    )
                }),
        }
    }
}

/// A numeric label: a whole number below `classes`.
fn number_label(text: &str, classes: usize) -> Result<u8, String> {
    let label = text
        .parse::<i64>()
        .map_err(|_| format!("label '{text}' is not a whole number"))?;
    usize::try_from(label)
        .ok()
        .filter(|&l| l < classes)
        .map(|l| l as u8)
        .ok_or_else(|| {
            format!("label {label} lies outside the class range 0..{classes} (set data.classes)")
        })
}

/// The labels of the training file as they are read: each distinct text held once, each row
/// as the number of its text.
#[derive(Debug, Default)]
pub(super) struct LabelTexts {
    index: HashMap<String, u16>,
    /// Each distinct text and the line it first appears on.
    texts: Vec<(String, usize)>,
    rows: Vec<u16>,
}

impl LabelTexts {
    pub(super) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Takes the label of the row on `line`.
    pub(super) fn push(&mut self, text: &str, line: usize) -> Result<(), String> {
        if text.is_empty() {
            return Err("the label is empty".into());
        }
        let id = match self.index.get(text) {
            Some(&id) => id,
            None => {
                if self.texts.len() == MAX_CLASSES {
                    return Err(format!(
                        "label '{text}' is the label column's {}th distinct value: a classifier \
                         takes at most {MAX_CLASSES} classes (is data.label the right column?)",
                        MAX_CLASSES + 1
                    ));
                }
                let id = self.texts.len() as u16;
                self.index.insert(text.to_string(), id);
                self.texts.push((text.to_string(), line));
                id
            }
        };
        self.rows.push(id);
        Ok(())
    }

    /// The classes the labels make and each row's class. Labels that are all whole numbers are
    /// class ids, checked against `data.classes`; any other text makes every label a name.
    /// An error names the line of the label at fault.
    pub(super) fn into_classes(
        self,
        data: &DataSettings,
    ) -> Result<(Classes, Vec<u8>), (usize, String)> {
        let numeric = self.texts.iter().all(|(t, _)| t.parse::<i64>().is_ok());
        let classes = if numeric {
            Classes::Numbers(data.numeric_classes())
        } else {
            let mut names: Vec<String> = self.texts.iter().map(|(t, _)| t.clone()).collect();
            names.sort_unstable();
            if let Some(allowed) = data.classes.filter(|&allowed| names.len() > allowed) {
                let (_, line) = &self.texts[allowed];
                return Err((
                    *line,
                    format!(
                        "the labels name {} classes, more than data.classes = {allowed} allows",
                        names.len()
                    ),
                ));
            }
            Classes::Names(names)
        };
        let mut class_of_text = Vec::with_capacity(self.texts.len());
        for (text, line) in &self.texts {
            class_of_text.push(classes.class_of(text).map_err(|e| (*line, e))?);
        }
        let labels = self
            .rows
            .iter()
            .map(|&id| class_of_text[id as usize])
            .collect();
        Ok((classes, labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(classes: Option<usize>) -> DataSettings {
        let mut data: DataSettings =
            toml::from_str("format = \"csv\"\ntrain_csv = \"x.csv\"\ntest_fraction = 0.2\n")
                .unwrap();
        data.classes = classes;
        data
    }

    fn classes_of(labels: &[&str], classes: Option<usize>) -> Result<(Classes, Vec<u8>), String> {
        let mut texts = LabelTexts::default();
        for (row, label) in labels.iter().enumerate() {
            texts.push(label, row + 1)?;
        }
        texts
            .into_classes(&data(classes))
            .map_err(|(line, e)| format!("line {line}: {e}"))
    }

    #[test]
    fn text_labels_are_classes_in_sorted_order() {
        let (classes, labels) =
            classes_of(&["malignant", "benign", "benign", "malignant"], None).unwrap();
        assert_eq!(
            classes,
            Classes::Names(vec!["benign".into(), "malignant".into()])
        );
        assert_eq!(labels, [1, 0, 0, 1]);
        assert_eq!(classes.class_of("benign"), Ok(0));
        let unseen = classes.class_of("unknown").unwrap_err();
        assert_eq!(
            unseen,
            "label 'unknown' is not a class the model was trained on ('benign', 'malignant')"
        );
    }

    #[test]
    fn whole_numbers_are_class_ids_and_anything_else_makes_names() {
        let (classes, labels) = classes_of(&["3", "0", "9"], None).unwrap();
        assert_eq!(classes, Classes::Numbers(10));
        assert_eq!(labels, [3, 0, 9]);
        let err = classes_of(&["3", "0", "10"], None).unwrap_err();
        assert_eq!(
            err,
            "line 3: label 10 lies outside the class range 0..10 (set data.classes)"
        );
        assert_eq!(
            classes_of(&["3", "0", "10"], Some(11)).unwrap().1,
            [3, 0, 10]
        );
        // One label that is not a whole number makes all of them names.
        let (classes, labels) = classes_of(&["1", "1.5", "2"], None).unwrap();
        assert_eq!(classes.names(), ["1", "1.5", "2"]);
        assert_eq!(labels, [0, 1, 2]);
    }

    #[test]
    fn refuses_empty_labels_and_more_names_than_allowed() {
        assert_eq!(
            classes_of(&["a", ""], None).unwrap_err(),
            "the label is empty"
        );
        let err = classes_of(&["c", "a", "b"], Some(2)).unwrap_err();
        assert_eq!(
            err,
            "line 3: the labels name 3 classes, more than data.classes = 2 allows"
        );
        let many: Vec<String> = (0..=MAX_CLASSES).map(|i| format!("c{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let err = classes_of(&many, None).unwrap_err();
        assert!(
            err.starts_with("label 'c256' is the label column's 257th"),
            "{err}"
        );
    }
}
