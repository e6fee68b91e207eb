//! Class names: from config.json's `label_names`, ImageNet-1k's for 1000-class checkpoints
//! without any, else `class_N`.

const IMAGENET: &str = include_str!("labels/imagenet.txt");

#[derive(Debug, Clone)]
pub struct Labels {
    names: Vec<String>,
}

impl Labels {
    pub fn new(num_classes: usize, given: Option<&[String]>) -> Result<Self, String> {
        let names = match given {
            Some(names) if names.len() == num_classes => names.to_vec(),
            Some(names) => {
                return Err(format!(
                    "{} label names for a model with {num_classes} classes",
                    names.len()
                ))
            }
            None if num_classes == 1000 => IMAGENET.lines().map(str::to_string).collect(),
            None => (0..num_classes).map(|i| format!("class_{i}")).collect(),
        };
        Ok(Self { names })
    }

    pub fn get(&self, index: usize) -> &str {
        &self.names[index]
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_names_are_in_class_order() {
        let l = Labels::new(1000, None).unwrap();
        assert_eq!(l.get(0), "tench, Tinca tinca");
        assert_eq!(l.get(281), "tabby, tabby cat");
        assert_eq!(l.get(999), "toilet tissue, toilet paper, bathroom tissue");
        assert_eq!(Labels::new(3, None).unwrap().get(2), "class_2");
        assert!(Labels::new(3, Some(&["a".into()])).is_err());
    }
}
